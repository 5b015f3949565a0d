"""Scale-out on Ray Serve (deploy/ray/): a real local Ray cluster (loopback only) with 2 replicas of the tiny model.

The HTTP contract through Ray's proxy, both replicas serving (``X-Replica``) and sharing concurrent load, the same
audio as the single-process service, per-replica metrics found by Prometheus, a client that leaves, a replica
killed under load, a replica removed with work in flight, and autoscaling. Those tests are slow (a Ray cluster
and two model processes start: about a minute on 2 cores of the run's two) and skip when the optional
``ray[serve]`` is not installed; the proxy middleware's own tests need no Ray.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

# Before Ray is imported: a one-machine cluster whose node address is 127.0.0.1 (on Linux Ray would take the
# host's address even when told 127.0.0.1); Ray's processes inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
try:
    import ray
    from ray import serve
except ImportError:
    ray = serve = None
yaml = pytest.importorskip("yaml")

from service_support import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
APP, DEPLOYMENT = "tta", "TTA"
PROXY_MIDDLEWARE = "deploy.ray.proxy:middlewares"
GEN = {"prompt": "rain on a tin roof", "duration": 1.0, "steps": 3, "seed": 11}
if str(ROOT) not in sys.path:  # deploy.ray.* (this folder's parent must be importable, never deploy/ itself)
    sys.path.insert(0, str(ROOT))


def wav(content: bytes) -> np.ndarray:
    data, sr = sf.read(io.BytesIO(content), dtype="int16", always_2d=True)
    assert sr == 44100 and data.shape[1] == 2
    return data.astype(np.int32)


# serve.status() is not safe to call from several threads at once: Ray 2.60 registers and unregisters its
# autoscaling-policy module for pickling by value around each call, process-wide, so two concurrent calls can
# unregister it twice ("... is not registered for pickle by value")
_STATUS_LOCK = threading.Lock()


def running_replicas() -> int:
    with _STATUS_LOCK:
        status = serve.status().applications[APP].deployments[DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def replica_settings(base_settings) -> dict:
    return base_settings.model_dump(mode="json", exclude={"host", "port", "replica_name"})


def deploy(replica_settings: dict, **autoscaling) -> None:
    """deploy/ray/serve.yaml as ``serve run`` / ``serve deploy`` apply it (a config, built on the cluster by
    ``deploy.ray.app:build``), with the tests' settings, half a CPU per replica and the given autoscaling; a
    config that changes only the autoscaling updates the running replicas in place."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config.pop("http_options")  # serve.start set them
    app = config["applications"][0]
    app["args"] = {"settings": replica_settings}
    deployment = app["deployments"][0]
    deployment.update(max_ongoing_requests=replica_settings["max_batch"] + replica_settings["queue_size"],
                      ray_actor_options={"num_cpus": 0.5}, autoscaling_config=autoscaling)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    wait_for(lambda: (a := serve.status().applications.get(APP)) is not None and a.status == "RUNNING"
             and running_replicas() == autoscaling.get("initial_replicas", autoscaling["min_replicas"]), 180,
             "the application to run", every=0.5)


@pytest.fixture(scope="module")
def ray_url(replica_settings):
    """A local Ray head (2 CPUs, node address 127.0.0.1) with Serve's proxy on a loopback port and the tiny models
    as 2 replicas of half a CPU each; the proxy middleware and deploy.ray come from this checkout."""
    if ray is None:
        pytest.skip("ray[serve] is not installed (pip install 'ray[serve]==2.60.0')")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_MIDDLEWARE, "RAY_USAGE_STATS_ENABLED": "0",
           # the autoscaling test's short windows: replicas and routers report load every half second
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # as the variable above says, should Ray have been imported before it
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning",
             log_to_driver=False, configure_logging=False)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray left the loopback address"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(replica_settings, min_replicas=2, max_replicas=2, initial_replicas=2)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def target_names(url: str) -> set[str]:
    return {g["labels"]["replica"] for g in httpx.get(url + "/metrics/targets", timeout=10).json()}


def post_many(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=timeout) as client, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post("/generate", json=b), bodies))


# ---------------------------------------------------------------------------------------------------- contract
@pytest.mark.slow
def test_http_contract_through_ray(ray_url, server):
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        assert client.get("/health/ready").status_code == 200
        assert {m["name"] for m in client.get("/models").json()} == {"tiny", "tiny-arc"}

        r = client.post("/generate", json=GEN)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "audio/wav"
        assert len(wav(r.content)) == round(GEN["duration"] * 44100)
        assert r.headers["x-seed"] == "11" and r.headers["x-model"] == "tiny"
        assert [s.split(";")[0] for s in r.headers["server-timing"].split(", ")] == ["queue", "encode", "denoise",
                                                                                     "decode"]
        assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]], "one X-Request-Id"
        assert r.headers["x-replica"].startswith(f"{APP}#{DEPLOYMENT}#")
        assert r.headers["x-content-type-options"] == "nosniff"
        # the same request alone on the single-process service: the same bytes
        alone = httpx.post(server.url + "/generate", json=GEN, timeout=60)
        assert alone.status_code == 200 and alone.content == r.content

        given = client.post("/generate", json=GEN, headers={"X-Request-Id": "client-id-1"})
        assert given.headers.get_list("x-request-id") == ["client-id-1"]

        bad = client.post("/generate", json={"prompt": "x" * 600})
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/json"
        assert bad.json()["error"]["code"] == "invalid_input" and "x-replica" in bad.headers
        missing = client.get("/no/such/route")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        unknown = client.post("/generate", json={**GEN, "model": "no-such-model"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"]


@pytest.mark.slow
def test_replicas_share_concurrent_load_with_the_same_audio(ray_url, server):
    """16 requests at once: Ray's router spreads them over both replicas; each answer is the single-process
    service's audio for the same request alone (within the 2 LSB that batch companions may change)."""
    bodies = [{"prompt": f"a {200 + 40 * i} Hz sine tone [[slow=100]]", "duration": 1.0, "steps": 3, "seed": i}
              for i in range(16)]
    answers = post_many(ray_url, bodies)
    assert [r.status_code for r in answers] == [200] * 16, [r.text[:200] for r in answers if r.status_code != 200]
    served = {}
    for r in answers:
        served[r.headers["x-replica"]] = served.get(r.headers["x-replica"], 0) + 1
    assert len(served) == 2 and min(served.values()) >= 4, f"load not spread: {served}"
    with server.client() as client:
        reference = [client.post("/generate", json=body) for body in bodies]
    for body, r, ref in zip(bodies, answers, reference):
        assert ref.status_code == 200
        diff = np.abs(wav(r.content) - wav(ref.content)).max()
        assert diff <= 2, f"seed {body['seed']}: {diff} LSB from the single-process service"


# ---------------------------------------------------------------------------------------------------- metrics
def _prometheus_up(config: dict, tmp_path: Path):
    prometheus = shutil.which("prometheus")
    if not prometheus:
        return None, None
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_every_replica_is_scraped_with_a_replica_label(ray_url, tmp_path):
    from test_deploy import RULE_FILES, _grafana_to_promql, dashboard_exprs, load_dashboard

    bodies = [dict(GEN, prompt=f"white noise [[slow=100]] {i}", seed=i) for i in range(6)]
    names = {r.headers["x-replica"] for r in post_many(ray_url, bodies)}
    assert len(names) == 2
    groups = httpx.get(ray_url + "/metrics/targets", timeout=10).json()
    assert {g["labels"]["replica"] for g in groups} == names
    for g in groups:  # each target is that replica's own registry, on this machine's loopback
        assert g["targets"][0].startswith("127.0.0.1:"), g
        text = httpx.get(f"http://{g['targets'][0]}/metrics", timeout=10).text
        assert "tta_requests_total" in text and "tta_ready 1.0" in text

    # Prometheus (Debian's package) with the shipped Ray config, pointed at this cluster's proxy.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-ray.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in RULE_FILES]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tta-ray")
    job.update(scrape_interval="1s", scrape_timeout="900ms")
    job["http_sd_configs"] = [{"url": ray_url + "/metrics/targets", "refresh_interval": "1s"}]
    proc, base = _prometheus_up(config, tmp_path)
    if proc is None:
        pytest.skip("prometheus binary not installed (Debian package `prometheus`); the targets were checked")
    try:
        def query(q: str) -> list:
            try:
                answer = httpx.get(base + "/api/v1/query", params={"query": q}, timeout=5).json()
            except (httpx.HTTPError, ValueError):  # not up yet: 503 in plain text while it starts
                return []
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        replicas = wait_for(lambda: {s["metric"]["replica"] for s in query('tta_ready{job="tta-ray"} == 1')}
                            if len(query('tta_ready{job="tta-ray"} == 1')) == 2 else None, 30, "two scraped replicas")
        assert replicas == names
        time.sleep(2.5)  # a second scrape, so rates have two points
        dash = load_dashboard()
        replica_panels = [(t, e) for t, e in dashboard_exprs(dash) if "replica)" in e or "by (replica" in e]
        assert len(replica_panels) >= 3
        for title, expr in replica_panels:
            got = {s["metric"].get("replica") for s in query(_grafana_to_promql(expr))}
            assert got == names, f"{title}: {expr} gave {got}"
        up = query(_grafana_to_promql(next(e for t, e in dashboard_exprs(dash) if t == "Replicas up and ready")))
        assert float(up[0]["value"][1]) == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def replica_metric(url: str, name: str, **labels) -> float:
    """A sample summed over every replica's own metrics endpoint (the targets of GET /metrics/targets)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for group in httpx.get(url + "/metrics/targets", timeout=10).json():
        text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=10).text
        total += sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                     if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    return total


@pytest.mark.slow
def test_a_client_that_leaves_frees_its_place_in_the_batch(ray_url):
    """Ray's proxy forwards the disconnect (deploy/ray/proxy.py) rather than cancelling the replica's task: the
    service ends the job at the next tick and counts a 499, as without Ray."""
    before = replica_metric(ray_url, "tta_requests_total", status="499")
    with pytest.raises(httpx.TimeoutException):  # 20 steps of 0.5 s: the client gives up after 1.5 s
        httpx.post(ray_url + "/generate", json={"prompt": "wind [[slow=500]]", "steps": 20, "duration": 1.0},
                   timeout=1.5)
    wait_for(lambda: replica_metric(ray_url, "tta_requests_total", status="499") == before + 1, 5,
             "a 499 for the request whose client left")
    assert replica_metric(ray_url, "tta_inflight_requests") == 0, "the abandoned sample still runs"


# ---------------------------------------------------------------------------------------------------- failure
@pytest.mark.slow
def test_killed_replica_fails_only_its_requests_and_is_replaced(ray_url):
    """Kill one replica's process while 8 slow requests are in flight: its own requests get a JSON 503 with
    Retry-After from the proxy (or finish elsewhere), the rest succeed, and the deployment is back to 2 replicas
    that serve."""
    bodies = [{"prompt": f"clicks at {60 + 10 * i} BPM [[slow=400]]", "duration": 1.0, "steps": 4, "seed": i}
              for i in range(8)]
    victim = sorted(target_names(ray_url))[0]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_many, ray_url, bodies)
        time.sleep(0.8)  # every request admitted, each about 1.6 s of denoising
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{victim}", namespace="serve"), no_restart=True)
        answers = pending.result(timeout=120)
    lost = [r for r in answers if r.status_code != 200]
    for r in lost:
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == "replica_lost"
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"]
    served = {r.headers["x-replica"] for r in answers if r.status_code == 200}
    assert lost and served and victim not in served, f"{len(lost)} lost, served by {served}, victim {victim}"

    # a new replica registers its metrics once warm; the victim's entry expires without its heartbeat
    def replaced():
        names = target_names(ray_url)
        return names if len(names) == 2 and victim not in names and running_replicas() == 2 else None

    names = wait_for(replaced, 90, "a running replacement and the killed replica's metrics target gone", every=0.5)
    after = post_many(ray_url, [dict(GEN, prompt=f"{GEN['prompt']} [[slow=100]]", seed=100 + i) for i in range(8)])
    assert [r.status_code for r in after] == [200] * 8
    assert {r.headers["x-replica"] for r in after} == names, "the replacement does not serve"


# ---------------------------------------------------------------------------------------------------- scaling
@pytest.mark.slow
def test_removed_replica_finishes_its_requests(ray_url, replica_settings):
    """Scale 2 -> 1 while 8 slow requests are in flight on both replicas: Ray stops routing to the replica it
    removes and waits (graceful_shutdown_timeout_s = TTA_DRAIN_TIMEOUT) for the requests it holds; all succeed."""
    bodies = [{"prompt": f"a kick drum hit [[slow=300]] {i}", "duration": 1.0, "steps": 4, "seed": i}
              for i in range(8)]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_many, ray_url, bodies)
        time.sleep(0.8)
        deploy(replica_settings, min_replicas=1, max_replicas=1, initial_replicas=1)
        answers = pending.result(timeout=120)
    assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers if r.status_code != 200]
    assert len({r.headers["x-replica"] for r in answers}) == 2, "the removed replica held none of them"
    assert running_replicas() == 1


@pytest.mark.slow
def test_autoscaling_up_under_load_and_down_when_idle(ray_url, replica_settings):
    """Short windows: under sustained load above the target of 2 ongoing requests per replica the deployment grows
    from 1 replica to its maximum of 2 and the new replica serves; idle, it shrinks back to 1."""
    deploy(replica_settings, min_replicas=1, max_replicas=2, initial_replicas=1, target_ongoing_requests=2,
           upscale_delay_s=0.5, downscale_delay_s=2, look_back_period_s=1, metrics_interval_s=0.5)
    seen: set[str] = set()
    stop = time.monotonic() + 60

    def client(i: int) -> None:
        with httpx.Client(base_url=ray_url, timeout=60) as c:
            n = 0
            while time.monotonic() < stop and not (running_replicas() == 2 and len(seen) == 2):
                r = c.post("/generate", json={"prompt": f"pink noise [[slow=100]] {i}", "duration": 1.0,
                                              "steps": 3, "seed": n})
                assert r.status_code == 200, r.text
                seen.add(r.headers["x-replica"])
                n += 1

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(client, range(6)))
    assert running_replicas() == 2 and len(seen) == 2, f"no upscale under load: {seen}"
    wait_for(lambda: running_replicas() == 1, 60, "the idle deployment to shrink to 1 replica", every=0.5)


# ---------------------------------------------------------------------------------------------------- proxy
def through_proxy(inner, headers: list | None = None) -> tuple[int, dict, bytes, dict]:
    """deploy.ray.proxy's middleware around ``inner`` (standing in for Ray's proxy app): the status, headers and
    body the client gets, and the scope ``inner`` saw."""
    from deploy.ray.proxy import JsonProxyErrors

    sent, seen = [], {}

    async def app(scope, receive, send):
        seen.update(scope)
        await inner(send)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": headers or []}
    asyncio.run(JsonProxyErrors(app)(scope, receive, send))
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer = {}
    for k, v in start["headers"]:
        answer.setdefault(k.decode().lower(), []).append(v.decode())
    return start["status"], answer, body, seen


def test_proxy_answers_a_lost_replica_with_a_json_503():
    async def died(send):  # Ray's proxy sends nothing when the replica dies with the request
        return None

    status, headers, body, seen = through_proxy(died, [(b"x-request-id", b"abc")])
    assert status == 503 and json.loads(body)["error"]["code"] == "replica_lost"
    assert headers["retry-after"] == ["1"] and headers["x-request-id"] == ["abc"]
    assert headers["content-type"] == ["application/json"]
    # the disconnect is forwarded to the replica instead of cancelling it
    assert (b"x-request-disconnect-disabled", b"?1") in seen["headers"]


def test_proxy_turns_its_own_plain_text_errors_into_the_service_shape():
    async def backpressure(send):  # max_queued_requests with backpressure_config 429 / retry_after_s 1
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure."})

    status, headers, body, _ = through_proxy(backpressure)
    assert status == 429 and headers["retry-after"] == ["1"]
    assert json.loads(body)["error"] == {"code": "queue_full", "message": "Request dropped due to backpressure."}


def test_proxy_passes_the_service_answers_through_with_one_request_id():
    error = json.dumps({"error": {"code": "invalid_input", "message": "prompt: too long"}}).encode()

    async def service_422(send):  # the service's answer, plus the copy of its id Ray's proxy appends
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"r1"),
                                (b"X-Request-ID", b"r1")]})
        await send({"type": "http.response.body", "body": error})

    status, headers, body, _ = through_proxy(service_422)
    assert (status, body, headers["x-request-id"]) == (422, error, ["r1"])
