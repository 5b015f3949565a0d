"""Shutdown: SIGTERM to a real server process with requests running and queued. Each request gets a clean answer
(its audio, or a JSON 503), nothing hangs, and the process exits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service_support import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def start_server(model_dir, **settings: str) -> tuple[subprocess.Popen, str]:
    """``python -m service`` on a free port with the tiny model, the eager runtime, no batching and the debug faults
    (``[[slow=ms]]`` prompts), plus ``settings`` (TTA_ variables); returns once it is ready."""
    port = free_port()
    env = dict(os.environ, TTA_HOST="127.0.0.1", TTA_PORT=str(port), TTA_MODEL_DIR=str(model_dir),
               TTA_DEFAULT_MODEL="tiny", TTA_THREADS="1", TTA_LOG_LEVEL="warning", TTA_DEBUG_FAULTS="1",
               TTA_RUNTIME="torch", TTA_POLICY="none", PYTHONPATH=str(ROOT), **settings)
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _status(url + "/health/ready") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not get ready: {proc.communicate()[0].decode()[-2000:]}")
        time.sleep(0.1)
    return proc, url


def test_sigterm_answers_running_and_queued_requests_and_exits(model_dir):
    proc, url = start_server(model_dir)
    try:
        deadline = time.monotonic() + 120
        bodies = [{"prompt": f"[[slow=60]] rain {i}", "steps": 6, "duration": 0.5, "seed": i} for i in range(4)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(httpx.post, url + "/generate", json=b, timeout=60) for b in bodies]
            # one request running (policy none), the others queued behind it
            while not (metric(url, "tta_inflight_requests") == 1 and metric(url, "tta_queue_depth") >= 2):
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=90) for f in futures]
        for r in answers:
            if r.status_code == 200:
                assert r.headers["content-type"] == "audio/wav" and len(r.content) > 44
            else:
                assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
                assert r.headers["x-request-id"]
        # uvicorn finishes its shutdown, then re-raises the signal: the exit status says SIGTERM, not a crash
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), proc.stdout.read().decode()
        with pytest.raises(httpx.TransportError):  # gone: no listener is left behind
            httpx.get(url + "/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_sigterm_drains_within_the_drain_timeout_with_a_clean_503_for_what_is_left(model_dir):
    """Work that cannot finish within TTA_DRAIN_TIMEOUT is answered with a JSON 503 and Retry-After when the drain
    time is up, instead of holding the shutdown for the request timeout."""
    proc, url = start_server(model_dir, TTA_DRAIN_TIMEOUT="1", TTA_REQUEST_TIMEOUT="120")
    try:
        deadline = time.monotonic() + 120
        bodies = [{"prompt": f"[[slow=400]] long {i}", "steps": 40, "duration": 0.5, "seed": i} for i in range(3)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(httpx.post, url + "/generate", json=b, timeout=120) for b in bodies]
            while not (metric(url, "tta_inflight_requests") == 1 and metric(url, "tta_queue_depth") >= 2):
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=60) for f in futures]  # 40 x 400 ms would take 16 s each
        for r in answers:
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert r.json()["error"]["code"] == "not_ready"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
