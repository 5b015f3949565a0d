"""The HTTP contract, against a real uvicorn server on a loopback port (tiny untrained models)."""
from __future__ import annotations

import io
import json
import re
import socket
import time

import httpx
import pytest
import soundfile as sf
from prometheus_client import CONTENT_TYPE_LATEST

from service_support import LiveServer

SR = 44100


def read_audio(content: bytes):
    info = sf.info(io.BytesIO(content))
    data, sr = sf.read(io.BytesIO(content), dtype="int16", always_2d=True)
    return info, data, sr


def test_health_models_docs(server):
    with server.client() as c:
        assert c.get("/health/live").json() == {"status": "alive"}
        ready = c.get("/health/ready")
        assert ready.status_code == 200 and set(ready.json()["models"]) == {"tiny", "tiny-arc"}
        models = {m["name"]: m for m in c.get("/models").json()}
        assert set(models) == {"tiny", "tiny-arc"}
        tiny = models["tiny"]
        for key in ("name", "kind", "default_steps", "max_steps", "default_guidance", "max_duration",
                    "default_duration", "runtime", "sample_rate"):
            assert key in tiny
        assert (tiny["default_steps"], tiny["max_steps"], tiny["max_duration"], tiny["runtime"],
                tiny["sample_rate"]) == (4, 50, 4.0, "torch", SR)
        assert models["tiny-arc"]["kind"] == "arc"
        assert c.get("/docs").status_code == 200
        assert "/generate" in c.get("/openapi.json").json()["paths"]
        root = c.get("/", follow_redirects=False)
        assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")  # the playground


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_generate_audio_contract(server, fmt, subtype):
    duration = 1.37
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "a dog barks twice", "duration": duration, "seed": 42, "format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(f"audio/{fmt}")
    info, data, sr = read_audio(r.content)
    assert (sr, info.channels, info.subtype) == (SR, 2, subtype)
    assert data.shape == (round(duration * SR), 2)
    assert abs(data).max() > 0
    assert r.headers["x-seed"] == "42" and r.headers["x-model"] == "tiny" and r.headers["x-request-id"]
    timing = r.headers["server-timing"]
    assert re.fullmatch(r"queue;dur=[\d.]+, encode;dur=[\d.]+, denoise;dur=[\d.]+, decode;dur=[\d.]+", timing), timing


def test_defaults_random_seed_and_request_id(server):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "rain on a tin roof"}, headers={"X-Request-Id": "my-req-1"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "my-req-1"
        seed = int(r.headers["x-seed"])
        assert 0 <= seed < 2**63
        assert read_audio(r.content)[1].shape == (SR, 2)  # default duration 1.0 s
        again = c.post("/generate", json={"prompt": "rain on a tin roof", "seed": seed})
        assert again.content == r.content  # the returned seed reproduces the audio
        other = c.post("/generate", json={"prompt": "rain on a tin roof", "seed": seed + 1})
        assert other.content != r.content


def test_other_model_and_edge_values(server):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "x" * 500, "model": "tiny-arc", "duration": 4.0, "steps": 1,
                                      "guidance": 0, "seed": 2**63 - 1})
        assert r.status_code == 200, r.text
        assert r.headers["x-model"] == "tiny-arc" and r.headers["x-seed"] == "9223372036854775807"
        assert read_audio(r.content)[1].shape == (4 * SR, 2)
        r = c.post("/generate", json={"prompt": "short", "duration": 0.5, "guidance": 20, "steps": 2})
        assert r.status_code == 200 and read_audio(r.content)[1].shape == (round(0.5 * SR), 2)
        # JSON has one number type: an integral number is an integer however it is written (JSON Schema's view)
        r = c.post("/generate", content=b'{"prompt": "short", "duration": 0.5, "steps": 2.0, "seed": 7e0}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and (r.headers["x-steps"], r.headers["x-seed"]) == ("2", "7"), r.text


@pytest.mark.parametrize("body,field", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "duration": 0.4}, "duration"),
    ({"prompt": "a", "duration": 4.01}, "duration"),
    ({"prompt": "a", "duration": "long"}, "duration"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 51}, "steps"),
    ({"prompt": "a", "steps": 2.5}, "steps"),
    ({"prompt": "a", "guidance": -0.1}, "guidance"),
    ({"prompt": "a", "guidance": 20.5}, "guidance"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**63}, "seed"),
    ({"prompt": "a", "format": "aac"}, "format"),
    ({"prompt": "a", "timeout": 0}, "timeout"),
    ({"prompt": "a", "colour": "blue"}, "colour"),
    ({"prompt": "a", "steps": "2"}, "steps"),  # strict JSON types: no number as a string,
    ({"prompt": "a", "duration": True}, "duration"),  # no bool as a number,
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "seed": 1.5}, "seed"),
    ({"prompt": "a", "guidance": "1"}, "guidance"),
    ({"prompt": "a", "model": ""}, "model"),  # and an empty model name is not the default
])
def test_invalid_input_is_422_naming_the_field(server, body, field):
    with server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input"
    assert field in err["message"] and err["field"] == field


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"[" * 7000 + b"]" * 7000,
                                     b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}"])
def test_malformed_body_is_422_not_500(server, content):
    with server.client() as c:
        r = c.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["field"] in ("body", "seed"), err  # never an offset


@pytest.mark.parametrize("content,problem", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"prompt": "caf\xe9"}', "not UTF-8"),
    (b'{"prompt": "a",}', "trailing comma"),
    (b"[" * 7000 + b"]" * 7000, "recursion limit"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "number out of range"),
])
def test_a_malformed_body_names_its_problem_not_an_offset(server, content, problem):
    with server.client() as c:
        r = c.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["field"] == "body" and problem in err["message"], err


@pytest.mark.parametrize("content,field", [
    (b'{"prompt": "a", "duration": NaN}', "duration"),
    (b'{"prompt": "a", "guidance": Infinity}', "guidance"),
    (b'{"prompt": "a", "duration": 1e400}', "duration"),
    (b'{"prompt": "a", "timeout": -Infinity}', "timeout"),
])
def test_non_finite_numbers_are_refused_naming_the_field(server, content, field):
    """pydantic's JSON parser reads NaN and Infinity (which JSON has not), and a form's "nan" / "inf"."""
    with server.client() as c:
        r = c.post("/generate", content=content, headers={"Content-Type": "application/json"})
        form = c.post("/generate", data={"prompt": "a", "inpaint_start": "inf", "inpaint_end": "inf"})
    for answer, name in ((r, field), (form, "inpaint_start")):
        assert answer.status_code == 422, answer.text
        err = answer.json()["error"]
        assert err["field"] == name and "finite" in err["message"], err


def test_unknown_model_is_404(server):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "a", "model": "no-such-model"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_model" and "no-such-model" in r.json()["error"]["message"]


def test_body_too_large_is_413(server):
    big = b'{"prompt": "' + b"a" * 20000 + b'"}'
    with server.client() as c:
        r = c.post("/generate", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(40):
                yield b"a" * 1000

        r = c.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method_are_json(server):
    with server.client() as c:
        r = c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/generate")
        assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"
        for method in ("PATCH", "PUT", "OPTIONS"):  # the path serves GET and DELETE, from two routes
            r = c.request(method, "/jobs/some-id")
            assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET", method
            assert r.json()["error"]["code"] == "method_not_allowed"


def test_metrics_move(server):
    before_ok = server.metric("tta_requests_total", model="tiny", status="200")
    before_422 = server.metric("tta_requests_total", status="422")
    before_audio = server.metric("tta_generated_audio_seconds_total", model="tiny")
    before_dur = server.metric("tta_request_duration_seconds_count", model="tiny")
    with server.client() as c:
        assert c.post("/generate", json={"prompt": "metrics", "duration": 1.5, "seed": 3}).status_code == 200
        assert c.post("/generate", json={"prompt": ""}).status_code == 422
        text = c.get("/metrics").text
    assert server.metric("tta_requests_total", model="tiny", status="200") == before_ok + 1
    assert server.metric("tta_requests_total", status="422") == before_422 + 1
    assert server.metric("tta_generated_audio_seconds_total", model="tiny") == pytest.approx(before_audio + 1.5)
    assert server.metric("tta_request_duration_seconds_count", model="tiny") == before_dur + 1
    for stage in ("encode", "denoise", "decode"):
        assert server.metric("tta_stage_duration_seconds_count", model="tiny", stage=stage) > 0
    assert server.metric("tta_queue_wait_seconds_count", model="tiny") > 0
    assert server.metric("tta_batch_size_count", model="tiny") > 0
    assert server.metric("tta_real_time_factor_count", model="tiny") > 0
    assert server.metric("tta_model_loaded", model="tiny", runtime="torch") == 1
    assert server.metric("tta_ready") == 1
    assert "tta_inflight_requests" in text and "tta_queue_depth" in text


def test_not_ready_is_503(base_settings):
    """The app before its models are loaded (no lifespan run): readiness and generation say 503."""
    from service.app import create_app

    app = create_app(base_settings)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            live = await c.get("/health/live")
            ready = await c.get("/health/ready")
            gen = await c.post("/generate", json={"prompt": "a"})
            metrics = await c.get("/metrics")
        return live, ready, gen, metrics

    import asyncio

    live, ready, gen, metrics = asyncio.run(go())
    assert live.status_code == 200
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert gen.status_code == 503 and gen.json()["error"]["code"] == "not_ready"
    assert "tta_ready 0.0" in metrics.text


def test_missing_default_model_stays_not_ready(base_settings, tmp_path):
    srv = LiveServer(base_settings.model_copy(update={"model_dir": tmp_path}), wait_ready=False)
    try:
        import time

        for _ in range(100):
            if srv.app.state.tta.load_error:
                break
            time.sleep(0.05)
        r = httpx.get(srv.url + "/health/ready")
        assert r.status_code == 503 and "tiny" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_api_keys(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"api_keys": "k1, secret-2", "warmup": False}))
    try:
        with srv.client() as c:
            body = {"prompt": "auth", "steps": 1, "duration": 0.5}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "k"}, {"Authorization": "k1"}):
                r = c.post("/generate", json=body, headers=headers)
                assert r.status_code == 401, headers
                assert r.json()["error"]["code"] == "unauthorized"
            assert c.get("/models").status_code == 401
            assert c.post("/generate", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
            assert c.post("/generate", json=body, headers={"X-API-Key": "secret-2"}).status_code == 200
            assert c.get("/models", headers={"X-API-Key": "k1"}).status_code == 200
            # a stale X-API-Key beside a valid bearer token (a proxy adds one, the client the other) is accepted
            assert c.get("/models", headers={"X-API-Key": "old", "Authorization": "Bearer k1"}).status_code == 200
            for open_path in ("/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json"):
                assert c.get(open_path).status_code == 200
    finally:
        srv.stop()
    srv = LiveServer(base_settings.model_copy(update={"api_keys": "k1", "protect_ops": True, "warmup": False}))
    try:
        with srv.client() as c:
            for ops_path in ("/metrics", "/docs", "/openapi.json"):
                assert c.get(ops_path).status_code == 401
                assert c.get(ops_path, headers={"Authorization": "Bearer k1"}).status_code == 200
            assert c.get("/health/live").status_code == 200  # probes stay open
    finally:
        srv.stop()


def test_a_500_body_names_no_internals(server, monkeypatch):
    """Whatever fails inside, the client's 500 says what failed in general terms and where to look (the log, by
    request id); the exception's type, text and traceback stay in the server log."""
    secret = "/srv/models/secret-path.safetensors: CUDA error 719"
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "boom [[fail]]", "steps": 2}, headers={"X-Request-Id": "fault-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "fault-1"
        message = r.json()["error"]["message"]
        assert "denoise" in message and "InjectedFault" not in message and "injected" not in message

        async def broken_run(*args, **kwargs):
            raise RuntimeError(secret)

        monkeypatch.setattr(server.app.state.tta.gateway, "run", broken_run)
        r = c.post("/generate", json={"prompt": "anything", "steps": 2}, headers={"X-Request-Id": "fault-2"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert secret not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text
    assert "fault-2" in r.json()["error"]["message"]
    assert server.metric("tta_requests_total", model="tiny", status="500") >= 2


def test_every_response_carries_security_headers_and_no_banner(server):
    with server.client() as c:
        for r in (c.get("/health/live"), c.get("/"), c.post("/generate", json={"prompt": ""}),
                  c.post("/generate", json={"prompt": "a bell", "steps": 1, "duration": 0.5})):
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert "server" not in r.headers or "uvicorn" not in r.headers["server"]


def test_the_api_page_works_offline_and_nothing_redirects_to_the_requests_host(server):
    with server.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower() and "https://" not in page.text.split("<body>")[0]
        assert c.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        r = c.get("/static", headers={"Host": "evil.example"}, follow_redirects=False)
        assert "evil.example" not in r.headers.get("location", "") and r.status_code != 307
        metrics_doc = c.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert list(metrics_doc) == [CONTENT_TYPE_LATEST]  # Prometheus text, not JSON


def test_cors_is_off_by_default_and_configurable(server, base_settings):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with server.client() as c:
        assert "access-control-allow-origin" not in c.options("/generate", headers=preflight).headers
    srv = LiveServer(base_settings.model_copy(update={"cors_origins": "https://app.example", "warmup": False}))
    try:
        with srv.client() as c:
            r = c.options("/generate", headers=preflight)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
            r = c.post("/generate", json={"prompt": "a bell", "steps": 1, "duration": 0.5},
                       headers={"Origin": "https://app.example"})
            assert r.status_code == 200 and "x-seed" in r.headers["access-control-expose-headers"].lower()
            other = c.options("/generate", headers={**preflight, "Origin": "https://other.example"})
            assert "access-control-allow-origin" not in other.headers
    finally:
        srv.stop()


def test_a_replica_names_itself_on_every_response(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"replica_name": "replica-7", "warmup": False}))
    try:
        with srv.client() as c:
            assert c.get("/health/live").headers["x-replica"] == "replica-7"
            assert c.post("/generate", json={"prompt": "x" * 600}).headers["x-replica"] == "replica-7"
    finally:
        srv.stop()


# every operation of the OpenAPI document and the statuses it declares: each one the route can answer (503 on every
# route: beyond TTA_MAX_CONNECTIONS any request gets over_capacity)
DOCUMENTED = {
    ("get", "/health/live"): {200, 503},
    ("get", "/health/ready"): {200, 503},
    ("get", "/metrics"): {200, 401, 503},
    ("get", "/models"): {200, 401, 503},
    ("post", "/generate"): {200, 401, 404, 408, 413, 422, 429, 500, 503, 504},
    ("post", "/v1/audio/generate"): {200, 400, 401, 404, 408, 413, 429, 500, 503, 504},
    ("post", "/jobs"): {202, 401, 404, 408, 413, 422, 429, 503},
    ("get", "/jobs/{job_id}"): {200, 401, 404, 503},
    ("get", "/jobs/{job_id}/events"): {200, 401, 404, 503},
    ("get", "/jobs/{job_id}/result"): {200, 401, 404, 409, 410, 503},
    ("delete", "/jobs/{job_id}"): {200, 202, 401, 404, 408, 413, 503},
}


def test_the_openapi_document_declares_every_answer_with_its_body(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    operations = {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert {k: {int(s) for s in op["responses"]} for k, op in operations.items()} == DOCUMENTED
    for (method, path), op in operations.items():
        error_body = "OpenAIErrorResponse" if path.startswith("/v1/") else "ErrorResponse"
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": f"#/components/schemas/{error_body}"}, (method, path, status)
                assert response["description"] not in ("", "Additional Response"), (method, path, status)
    # FastAPI's default 422 body is a shape the service never answers
    assert "HTTPValidationError" not in json.dumps(doc)
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"code", "message", "field"}
    # the seed's bound exactly (FastAPI's OpenAPI model would make it the float 9.223372036854776e18, i.e. 2**63)
    bodies = [(path, op["requestBody"]["content"]) for (_, path), op in operations.items() if "requestBody" in op]
    assert len(bodies) == 3
    for path, content in bodies:
        for media_type, body in content.items():
            seed = body["schema"]["properties"]["seed"]
            bound = seed["anyOf"][0] if "anyOf" in seed else seed
            assert (bound["type"], bound["minimum"], bound["maximum"]) == ("integer", 0, 2**63 - 1), (path, seed)
            assert type(bound["maximum"]) is int and type(bound["minimum"]) is int
            if media_type == "multipart/form-data":  # a form field is there or not, never null
                assert '"null"' not in json.dumps(body["schema"]), path
    assert '"maximum":9223372036854775807' in httpx.get(server.url + "/openapi.json").text  # the bytes, too


def test_over_the_connection_limit_a_request_gets_a_json_503(base_settings):
    """Beyond TTA_MAX_CONNECTIONS (uvicorn's limit_concurrency) the answer is the service's JSON error (uvicorn's own
    is plain text), counted in the metrics; the limit counts the open connections, this one included."""
    srv = LiveServer(base_settings.model_copy(update={"max_connections": 2, "warmup": False}))
    try:
        idle = socket.create_connection(("127.0.0.1", srv.port))
        try:
            time.sleep(0.2)
            for r in (httpx.get(srv.url + "/health/live"), httpx.post(srv.url + "/generate", json={"prompt": "a"})):
                assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
                assert r.json()["error"]["code"] == "over_capacity" and "2 connections" in r.json()["error"]["message"]
                assert r.headers["retry-after"] == "1" and r.headers["x-content-type-options"] == "nosniff"
        finally:
            idle.close()
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health/live").status_code != 200:  # the server notices the close
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert srv.metric("tta_requests_total", model="unknown", status="503") == 1
    finally:
        srv.stop()
