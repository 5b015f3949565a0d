"""Connection hygiene of the real server process: connections that send nothing or trickle their headers are
closed after the header timeout, so they cannot lock the service out of file descriptors; a stalled body gets 408;
beyond the connection limit a request gets a clean 503; no server banner."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service_support import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.fixture(scope="module")
def guarded_server(model_dir):
    """``python -m service`` with 256 file descriptors, a 1 s header timeout, a 2 s body timeout and 100 connections."""
    port = free_port()
    env = dict(os.environ, TTA_HOST="127.0.0.1", TTA_PORT=str(port), TTA_MODEL_DIR=str(model_dir),
               TTA_DEFAULT_MODEL="tiny", TTA_THREADS="1", TTA_LOG_LEVEL="warning", TTA_RUNTIME="torch",
               TTA_WARMUP="false", TTA_HEADER_TIMEOUT="1", TTA_BODY_TIMEOUT="2", TTA_MAX_CONNECTIONS="100",
               PYTHONPATH=str(ROOT))

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=limit_files)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _status(url + "/health/ready") != 200:
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.1)
    yield url, port
    proc.terminate()
    proc.wait(timeout=30)


def test_idle_connections_cannot_lock_the_service_out(guarded_server):
    url, port = guarded_server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # this side holds 300 sockets
    idle = []
    for _ in range(300):  # more than the server's 256 file descriptors
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    try:
        deadline = time.monotonic() + 15  # the idle ones go after 1 s; the accept backlog then drains
        while _status(url + "/health/live") != 200:
            assert time.monotonic() < deadline, "the service stayed locked out"
            time.sleep(0.2)
        slow.settimeout(5)
        try:  # closed by the server: an orderly close, or a reset (it had unread bytes of ours)
            assert slow.recv(100) == b""
        except ConnectionResetError:
            pass
    finally:
        for s in idle + [slow]:
            s.close()


def test_a_stalled_body_gets_408(guarded_server):
    _, port = guarded_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = b""
        while b"request_timeout" not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_no_server_banner(guarded_server):
    url, _ = guarded_server
    r = httpx.get(url + "/health/live")
    assert "server" not in r.headers
