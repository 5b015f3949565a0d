"""Asynchronous jobs (``POST /jobs``) on a real server: the lifecycle and its events, cancellation, expiry, ownership
under API keys, webhooks, the shared queue bound, and the Python client (``service.client``) over all of it."""
from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest
from service_support import LiveServer

from service.client import (
    ERRORS,
    ApiError,
    Client,
    Expired,
    InvalidInput,
    JobNotReady,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    Unauthorized,
    error_from,
)
from service.webhooks import SIGNATURE_HEADER, verify

BODY = {"prompt": "a 440 Hz sine tone", "duration": 1.0, "steps": 6, "seed": 11}


def follow(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """The job's SSE stream, parsed (by the client), until it ends."""
    return [(e.name, e.data) for e in Client(http=client).events(job_id)]


def wait_final(client: httpx.Client, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get(f"/jobs/{job_id}").json()
        if info["status"] in ("done", "failed", "cancelled"):
            return info
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def jobs_server(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"job_ttl": 1.5, "max_connections": 64}))
    yield srv
    srv.stop()


def test_a_job_goes_queued_running_done_with_one_event_per_step(jobs_server):
    with jobs_server.client() as http:
        r = http.post("/jobs", json=BODY)
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/jobs/{job['id']}" and len(job["id"]) >= 22
        assert job["links"]["events"] == f"/jobs/{job['id']}/events" and job["seed"] == 11 and job["steps"] == 6
        events = follow(http, job["id"])
        names = [n for n, _ in events]
        assert names[0] == "queued" and "running" in names and names[-2:] == ["decoding", "done"], names
        steps = [d["step"] for n, d in events if n == "step"]
        assert steps == [1, 2, 3, 4, 5, 6] and all(d["steps"] == 6 for n, d in events if n == "step")
        assert names.index("running") < names.index("step")
        assert events[-1][1]["result"] == f"/jobs/{job['id']}/result"
        info = http.get(f"/jobs/{job['id']}").json()
        assert info["status"] == "done" and info["step"] == 6 and info["stage"] == "finished"
        assert set(info["timings"]) == {"queue", "encode", "denoise", "decode"} and info["finished_at"] > 0
        result = http.get(f"/jobs/{job['id']}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "audio/wav"
        assert result.headers["x-seed"] == "11"
        # the same request through /generate: the same bytes
        direct = http.post("/generate", json=BODY)
        assert direct.status_code == 200 and direct.content == result.content
        # the stream replays from the start for a late follower, and resumes after Last-Event-ID
        assert [n for n, _ in follow(http, job["id"])] == names
        resumed = [e.name for e in Client(http=http).events(job["id"], after=len(names) - 3)]
        assert resumed == names[-2:]
    assert jobs_server.metric("tta_jobs", state="done") >= 1
    assert jobs_server.metric("tta_requests_total", model="tiny", status="202") >= 1


def test_cancel_mid_run_frees_the_slot_at_the_next_tick(jobs_server):
    engine = jobs_server.engine
    with jobs_server.client() as http:
        job = http.post("/jobs", json=dict(BODY, prompt="wind [[slow=150]]", steps=40)).json()
        seen = []
        client = Client(http=http)
        for event in client.events(job["id"]):
            seen.append(event.name)
            if event.name == "step" and event.data["step"] == 2:
                r = http.delete(f"/jobs/{job['id']}")
                assert r.status_code == 202 and r.json()["status"] in ("running", "cancelled")
                ticks = engine.ticks
        assert seen[-1] == "cancelled" and seen.count("step") <= 3
        assert engine.ticks - ticks <= 1  # it left at the next tick, taking no more steps than that one
        info = http.get(f"/jobs/{job['id']}").json()
        assert info["status"] == "cancelled" and info["error"]["code"] == "client_closed_request"
        assert info["step"] < 40
        assert sum(len(s.running) for s in engine.schedulers.values()) == 0
        r = http.get(f"/jobs/{job['id']}/result")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_cancelled"


def test_a_failed_job_reports_the_error_generate_would_give(jobs_server):
    with jobs_server.client() as http:
        job = http.post("/jobs", json=dict(BODY, prompt="broken [[fail]]")).json()
        info = wait_final(http, job["id"])
        assert info["status"] == "failed" and info["error"]["status"] == 500
        assert info["error"]["code"] == "internal_error" and "denoise stage" in info["error"]["message"]
        r = http.get(f"/jobs/{job['id']}/result")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_failed"
        with pytest.raises(ServerError) as caught:
            Client(http=http).wait(job["id"])
        assert caught.value.code == "internal_error"


@pytest.mark.slow  # waits out the result time twice
def test_results_expire_and_statuses_are_forgotten(jobs_server):
    """job_ttl 1.5 s: the result is gone (410) after it, the status after twice it (404); DELETE on a finished job
    discards its result at once."""
    with jobs_server.client() as http:
        a = http.post("/jobs", json=dict(BODY, seed=1)).json()
        b = http.post("/jobs", json=dict(BODY, seed=2)).json()
        wait_final(http, a["id"]), wait_final(http, b["id"])
        assert http.get(f"/jobs/{a['id']}/result").status_code == 200
        r = http.delete(f"/jobs/{b['id']}")
        assert r.status_code == 200 and r.json()["result_expired"] is True
        gone = http.get(f"/jobs/{b['id']}/result")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "job_expired"
        time.sleep(1.6)
        assert http.get(f"/jobs/{a['id']}/result").status_code == 410
        assert http.get(f"/jobs/{a['id']}").json()["result_expired"] is True
        time.sleep(1.6)
        r = http.get(f"/jobs/{a['id']}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_job"
        assert http.get("/jobs/not-a-job/events").status_code == 404


@pytest.mark.slow  # a server of its own
def test_the_result_budget_expires_the_oldest_first(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"job_result_bytes": 120_000}))  # one 1 s WAV (~176 KB) at most
    try:
        with srv.client() as http:
            first = http.post("/jobs", json=dict(BODY, duration=0.5, seed=1)).json()
            wait_final(http, first["id"])
            assert http.get(f"/jobs/{first['id']}/result").status_code == 200
            second = http.post("/jobs", json=dict(BODY, duration=0.5, seed=2)).json()
            wait_final(http, second["id"])
            assert http.get(f"/jobs/{first['id']}/result").status_code == 410
            assert http.get(f"/jobs/{second['id']}/result").status_code == 200
            assert srv.metric("tta_job_result_bytes") <= 120_000
    finally:
        srv.stop()


class Receiver(http.server.BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):  # noqa: N802 - the standard library's name
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.calls.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow  # a server of its own
def test_keys_own_jobs_and_webhooks_are_signed_and_called_once(base_settings):
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = receiver.server_address[1]
    srv = LiveServer(base_settings.model_copy(update={"api_keys": "key-a,key-b", "webhook_secret": "s3cret",
                                                      "webhook_hosts": f"127.0.0.1:{port}"}))
    try:
        a, b = (srv.client(headers={"Authorization": f"Bearer {k}"}) for k in ("key-a", "key-b"))
        hook = f"http://127.0.0.1:{port}/hook"
        r = a.post("/jobs", json=dict(BODY, webhook=hook))
        assert r.status_code == 202, r.text
        job = r.json()
        # another key cannot see, follow, fetch or cancel it; no key gets 401
        for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/result"), ("DELETE", "")):
            assert b.request(method, f"/jobs/{job['id']}{path}").status_code == 404
        assert httpx.get(f"{srv.url}/jobs/{job['id']}").status_code == 401
        info = wait_final(a, job["id"])
        assert info["status"] == "done"
        deadline = time.monotonic() + 10
        while not Receiver.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a second call would come now
        assert len(Receiver.calls) == 1
        headers, body = Receiver.calls[0]
        assert verify("s3cret", headers[SIGNATURE_HEADER], body) and not verify("other", headers[SIGNATURE_HEADER],
                                                                               body)
        payload = json.loads(body)
        assert payload["id"] == job["id"] and payload["status"] == "done" and headers["X-TTA-Job-Id"] == job["id"]
        assert a.get(f"/jobs/{job['id']}").json()["webhook"]["state"] == "delivered"
        # hosts the operator did not allow are refused before anything runs
        for url in ("http://169.254.169.254/latest", "ftp://127.0.0.1/x", f"http://user:pw@127.0.0.1:{port}/",
                    f"http://127.0.0.1:{port + 1}/hook", "not a url"):
            r = a.post("/jobs", json=dict(BODY, webhook=url))
            assert r.status_code == 422 and r.json()["error"]["field"] == "webhook", url
    finally:
        srv.stop()
        receiver.shutdown()


@pytest.mark.slow  # a server of its own
def test_jobs_and_generate_share_one_queue_bound(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"queue_size": 2, "max_batch": 1}))
    try:
        with srv.client() as http:
            slow = dict(BODY, prompt="rain [[slow=300]]", steps=10)
            ids = [http.post("/jobs", json=dict(slow, seed=i)).json()["id"] for i in range(3)]  # 1 runs, 2 wait
            r = http.post("/generate", json=BODY)
            assert r.status_code == 429 and "retry-after" in r.headers
            r = http.post("/jobs", json=BODY)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            queued = http.get(f"/jobs/{ids[2]}").json()
            assert queued["status"] == "queued" and queued["queue_position"] == 2
            for job_id in ids:
                http.delete(f"/jobs/{job_id}")
            assert all(wait_final(http, j)["status"] == "cancelled" for j in ids)
    finally:
        srv.stop()


def test_the_client_round_trips_every_error_code(jobs_server):
    """Each error status the service answers with comes back as its own exception type, with code, message, field
    and Retry-After."""
    with Client(jobs_server.url) as c:
        clip = c.generate(BODY["prompt"], duration=1.0, steps=2, seed=5)
        assert clip.seed == 5 and clip.media_type == "audio/wav" and clip.audio[:4] == b"RIFF"
        with pytest.raises(InvalidInput) as e:
            c.generate("x", duration=99.0)
        assert e.value.status == 422 and e.value.field == "duration"
        with pytest.raises(NotFound) as e:
            c.generate("x", model="no-such-model")
        assert e.value.code == "unknown_model"
        with pytest.raises(NotFound):
            c.status("no-such-job")
        job = c.submit("wind [[slow=100]]", steps=30, duration=1.0)
        with pytest.raises(JobNotReady) as e:
            c.result(job)
        assert e.value.code == "job_not_finished" and e.value.retry_after == 1.0
        c.cancel(job)
        progress = []
        with pytest.raises(ApiError) as e:
            c.wait(job, on_progress=progress.append)
        assert e.value.status == 499 and progress[-1].name == "cancelled"
        done = c.submit("a click", steps=2, duration=1.0)
        assert c.wait(done).audio[:4] == b"RIFF"
        c.cancel(done)
        with pytest.raises(Expired):
            c.result(done)
    with Client(jobs_server.url, api_key="whatever") as c:  # keys are off: a key is ignored
        assert c.models()
    keyed = LiveServer(jobs_server.settings.model_copy(update={"api_keys": "k", "queue_size": 0}))
    try:
        with pytest.raises(Unauthorized):
            Client(keyed.url).models()
        with pytest.raises(QueueFull) as e:  # a queue of size 0 refuses everything
            Client(keyed.url, api_key="k").submit("rain")
        assert e.value.retry_after is not None and e.value.retry_after >= 1
    finally:
        keyed.stop()
    assert {401, 404, 408, 409, 410, 413, 422, 429, 499, 500, 503, 504} <= set(ERRORS)
    with Client(jobs_server.url) as c, pytest.raises(PayloadTooLarge) as e:  # refused before parsing
        c.generate("x" * 20_000)
    assert e.value.code == "payload_too_large"


def test_every_error_body_maps_to_its_type():
    """The error bodies the service sends, each to its exception type with code, message, field and Retry-After
    (also a body that is not the service's: a proxy's HTML page)."""
    for status, cls in ERRORS.items():
        body = {"error": {"code": f"code{status}", "message": f"m{status}", "field": "duration"}}
        err = error_from(status, body, {"retry-after": "7"})
        assert type(err) is cls and isinstance(err, ApiError) and err.status == status
        assert (err.code, err.message, err.field, err.retry_after) == (f"code{status}", f"m{status}", "duration", 7.0)
    proxy = error_from(502, None, {})
    assert isinstance(proxy, ServerError) and proxy.code == "http_error" and proxy.retry_after is None
    assert type(error_from(418, {"error": "teapot"}, {})) is ApiError
