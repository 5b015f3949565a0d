"""POST /v1/audio/generate, vLLM-Omni's audio generation API, against real servers: its documented requests, the
same audio as POST /generate, and every error in its OpenAI-style shape."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import socket
import time
from http import HTTPStatus

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import float32_default

from service_support import LiveServer, build_tiny_bundle

PATH = "/v1/audio/generate"
SR = 44100
# the request bodies of vLLM-Omni's audio generation docs (its quick start, and its API reference's full body)
QUICK_START = {"input": "The sound of a cat purring", "audio_length": 10.0}
FULL_BODY = {"input": "Text description of the audio", "audio_length": 10.0, "audio_start": 0.0,
             "negative_prompt": "Low quality", "guidance_scale": 7.0, "num_inference_steps": 100, "seed": 42,
             "response_format": "wav"}


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, text_encoder, base_settings):
    """The tiny model with room for the documented requests (10 s, 100 steps)."""
    with float32_default():
        bundle = build_tiny_bundle("tiny", text_encoder, 0)
        bundle.config = dataclasses.replace(bundle.config, max_duration=10.0, max_steps=100)
        root = tmp_path_factory.mktemp("zoo-long")
        bundle.save(root / "tiny", save_codec=True)
        srv = LiveServer(base_settings.model_copy(update={"model_dir": root, "warmup": False}))
    yield srv
    srv.stop()


def assert_openai_error(r: httpx.Response, status: int, kind: str, param: str | None) -> dict:
    """vLLM-Omni's error body: exactly message, type, param, code (the HTTP status)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and set(r.json()) == {"error"}
    assert (error["type"], error["param"], error["code"]) == (kind, param, status), error
    assert error["message"]
    return error


@pytest.mark.parametrize("body", [QUICK_START, FULL_BODY], ids=["quick-start", "full-body"])
def test_the_documented_requests_answer_audio_of_the_asked_length(long_server, body):
    with long_server.client() as c:
        r = c.post(PATH, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(r.content), dtype="int16", always_2d=True)
    assert (rate, audio.shape) == (SR, (round(10.0 * SR), 2)) and np.abs(audio).max() > 0
    assert r.headers["x-model"] == "tiny" and r.headers["x-request-id"]
    if "seed" in body:
        assert (r.headers["x-seed"], r.headers["x-steps"], r.headers["x-guidance"]) == ("42", "100", "7")


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_the_same_request_gives_the_same_bytes_as_generate(server, fmt):
    compat = {"input": "a door creaks open", "audio_length": 1.5, "num_inference_steps": 3, "guidance_scale": 2.5,
              "negative_prompt": "hiss", "seed": 77, "model": "tiny", "response_format": fmt}
    native = {"prompt": "a door creaks open", "duration": 1.5, "steps": 3, "guidance": 2.5, "negative_prompt": "hiss",
              "seed": 77, "model": "tiny", "format": fmt}
    with server.client() as c:
        a, b = c.post(PATH, json=compat), c.post("/generate", json=native)
        other_seed = c.post(PATH, json={**compat, "seed": 78})
    assert a.status_code == b.status_code == other_seed.status_code == 200, (a.text, b.text)
    assert a.content == b.content and a.headers["content-type"] == b.headers["content-type"]
    assert other_seed.content != a.content
    for header in ("x-seed", "x-model", "x-steps", "x-guidance"):
        assert a.headers[header] == b.headers[header]


def test_formats_defaults_and_unknown_fields(server):
    base = {"input": "wind through pines", "audio_length": 1.0, "seed": 3}
    with server.client() as c:
        pcm = c.post(PATH, json={**base, "response_format": "pcm"})
        opus = c.post(PATH, json={**base, "response_format": "opus"})
        aac = c.post(PATH, json={**base, "response_format": "aac"})
        wav = c.post(PATH, json=base)
        # fields vLLM-Omni's other audio routes know, and any other, are ignored as there
        extra = c.post(PATH, json={**base, "voice": "alloy", "instructions": "calm", "colour": "blue",
                                   "speed": 1.0, "stream_format": "audio", "audio_start": 0})
        bare = c.post(PATH, json={"input": "wind through pines"})
    assert pcm.headers["content-type"] == "audio/pcm" and len(pcm.content) == SR * 2 * 2
    assert opus.headers["content-type"] == "audio/ogg; codecs=opus"
    assert sf.info(io.BytesIO(opus.content)).samplerate == 48000
    assert aac.headers["content-type"] == "audio/wav" and aac.content == wav.content  # as vLLM-Omni: no AAC encoder
    assert pcm.content == wav.content[44:]  # the WAV's samples, without its 44-byte header
    assert extra.status_code == 200 and extra.content == wav.content
    assert bare.status_code == 200 and bare.headers["x-model"] == "tiny"  # the model's default length: 1 s
    assert sf.info(io.BytesIO(bare.content)).frames == SR


@pytest.mark.parametrize("body,param", [
    ({"audio_length": 1.0}, "input"),
    ({"input": ""}, "input"),
    ({"input": "x" * 501}, "input"),
    ({"input": "x", "audio_length": "long"}, "audio_length"),
    ({"input": "x", "audio_length": 0.1}, "audio_length"),
    ({"input": "x", "audio_length": 9.0}, "audio_length"),  # over the model's max_duration (4 s)
    ({"input": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"input": "x", "num_inference_steps": 51}, "num_inference_steps"),  # over the model's max_steps
    ({"input": "x", "guidance_scale": 25.0}, "guidance_scale"),
    ({"input": "x", "seed": -1}, "seed"),
    ({"input": "x", "response_format": "ogg"}, "response_format"),
    ({"input": "x", "speed": 2.0}, "speed"),
    ({"input": "x", "speed": 9.0}, "speed"),
    ({"input": "x", "audio_start": 2.0}, "audio_start"),
    ({"input": "x", "stream_format": "sse"}, "stream_format"),
    ({"input": "x", "seed": False}, "seed"),  # strict types, as on /generate
    ({"input": "x", "num_inference_steps": "8"}, "num_inference_steps"),
    ({"input": "x", "audio_length": True}, "audio_length"),
])
def test_invalid_input_is_a_400_naming_the_field(server, body, param):
    with server.client() as c:
        r = c.post(PATH, json=body)
    error = assert_openai_error(r, 400, "BadRequestError", param)
    assert error["message"].startswith(param)


def test_malformed_json_is_a_400(server):
    def post(content: bytes) -> httpx.Response:
        return c.post(PATH, content=content, headers={"content-type": "application/json"})

    with server.client() as c:
        assert_openai_error(post(b"{not json"), 400, "BadRequestError", "body")
        latin1 = assert_openai_error(post('{"input": "café"}'.encode("latin-1")), 400, "BadRequestError", "body")
        # NaN, which pydantic's JSON parser reads, is no finite number
        nan = assert_openai_error(post(b'{"input": "x", "guidance_scale": NaN}'), 400, "BadRequestError",
                                  "guidance_scale")
    assert "not UTF-8" in latin1["message"] and "finite" in nan["message"]


def test_over_the_connection_limit_is_a_503_in_the_same_shape(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"max_connections": 2, "warmup": False}))
    try:
        with socket.create_connection(("127.0.0.1", srv.port)):  # with the request's own, the limit of 2
            time.sleep(0.2)
            r = httpx.post(srv.url + PATH, json={"input": "x"})
    finally:
        srv.stop()
    assert "maximum of 2 connections" in assert_openai_error(r, 503, "Service Unavailable", None)["message"]
    assert r.headers["retry-after"] == "1"


def test_unknown_model_is_a_404(server):
    with server.client() as c:
        r = c.post(PATH, json={"input": "x", "model": "stabilityai/stable-audio-open-1.0"})
    assert "tiny" in assert_openai_error(r, 404, "NotFoundError", "model")["message"]


def test_body_limit_and_wrong_method_answer_in_the_same_shape(server):
    with server.client() as c:
        big = c.post(PATH, json={"input": "x", "negative_prompt": "y" * 20000})
        get = c.get(PATH)
    assert_openai_error(big, 413, HTTPStatus(413).phrase, None)  # "Content Too Large" from Python 3.13
    assert_openai_error(get, 405, "Method Not Allowed", None)


def test_api_keys_401(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"api_keys": "k1", "warmup": False}))
    try:
        with srv.client() as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = c.post(PATH, json={"input": "x"}, headers=headers)
                assert_openai_error(r, 401, "Unauthorized", None)
                assert r.headers["www-authenticate"] == "Bearer"
            assert c.post(PATH, json={"input": "x", "audio_length": 0.5},
                          headers={"Authorization": "Bearer k1"}).status_code == 200
    finally:
        srv.stop()


def test_full_queue_429(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"queue_size": 0, "warmup": False}))
    try:
        with srv.client() as c:
            r = c.post(PATH, json={"input": "x"})
        assert_openai_error(r, 429, "Too Many Requests", None)
        assert int(r.headers["retry-after"]) >= 1
        assert srv.metric("tta_requests_total", model="tiny", status="429") == 1
    finally:
        srv.stop()


def test_not_ready_503(base_settings):
    """The app before its models are loaded (no lifespan run)."""
    from service.app import create_app

    async def go():
        transport = httpx.ASGITransport(app=create_app(base_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post(PATH, json={"input": "x"})

    r = asyncio.run(go())
    assert_openai_error(r, 503, "Service Unavailable", None)
    assert r.headers["retry-after"] == "5"


def test_requests_are_counted_and_carry_their_id(server):
    before = {s: server.metric("tta_requests_total", model="tiny", status=s) for s in ("200", "400")}
    with server.client() as c:
        ok = c.post(PATH, json={"input": "x", "audio_length": 0.5, "model": "tiny"}, headers={"X-Request-Id": "r-1"})
        bad = c.post(PATH, json={"input": "x", "audio_length": 9.0, "model": "tiny"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "r-1" and bad.headers["x-request-id"]
    assert server.metric("tta_requests_total", model="tiny", status="200") == before["200"] + 1
    assert server.metric("tta_requests_total", model="unknown", status="400") >= 1  # refused before its model
    assert server.metric("tta_requests_total", model="tiny", status="400") == before["400"]


def test_the_openapi_schema_describes_the_route(server):
    with server.client() as c:
        op = c.get("/openapi.json").json()["paths"][PATH]["post"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"input", "audio_length", "negative_prompt", "guidance_scale", "num_inference_steps", "seed",
            "response_format", "model"} <= set(props)
    assert "audio/mpeg" in op["responses"]["200"]["content"]
    assert {"400", "401", "404", "429", "503"} <= set(op["responses"])
    # the values this server takes, exactly: what the schema admits is not refused for its form
    assert (props["input"]["minLength"], props["input"]["maxLength"]) == (1, 500)
    assert props["seed"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    assert props["stream_format"]["anyOf"][0]["const"] == "audio"
    assert {k: props["speed"]["anyOf"][0][k] for k in ("minimum", "maximum")} == {"minimum": 1.0, "maximum": 1.0}
