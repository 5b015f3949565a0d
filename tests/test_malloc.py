"""glibc's allocator setup (service/malloc.py): freed large buffers go back to the system, the operator's own
settings win, and the service applies it before its models load."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service import malloc

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(malloc._libc() is None, reason="the C library is not glibc")

# After glibc frees one large mapped block it raises its mmap threshold, so later blocks of a few MiB come from the
# heap; small live objects between them keep their memory from going back when they are freed.
FRAGMENT = textwrap.dedent("""
    import ctypes, json, sys
    from service import malloc
    applied = malloc.tune() if sys.argv[1] == "tuned" else {}
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
    def block(size):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p
    libc.free(block(16 << 20))
    base = rss_mib()
    blocks, pins = [], []
    for _ in range(64):
        blocks.append(block(4 << 20))
        pins.append(block(100 << 10))
    peak = rss_mib()
    for p in blocks:
        libc.free(p)
    print(json.dumps({"applied": applied, "base": base, "peak": peak, "after": rss_mib()}))
""")


def run_fragment(mode: str, **env) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None}, check=True)
    return json.loads(out.stdout)


def clean_env() -> dict:
    return {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None, "MALLOC_ARENA_MAX": None,
            "GLIBC_TUNABLES": None}


def test_freed_large_buffers_go_back_to_the_system_once_tuned():
    plain = run_fragment("plain", **clean_env())
    tuned = run_fragment("tuned", **clean_env())
    assert tuned["applied"] == {"MALLOC_MMAP_THRESHOLD_": malloc.MMAP_THRESHOLD,
                                "MALLOC_TRIM_THRESHOLD_": malloc.TRIM_THRESHOLD, "MALLOC_ARENA_MAX": malloc.ARENA_MAX}
    for r in (plain, tuned):
        assert r["peak"] - r["base"] > 250  # 64 x 4 MiB were resident
    # glibc's defaults keep the freed blocks (the pins between them hold the heap); tuned, only the pins remain
    assert plain["after"] - plain["base"] > 200
    assert tuned["after"] - tuned["base"] < 16


def test_the_operators_settings_win():
    r = run_fragment("tuned", **{**clean_env(), "MALLOC_ARENA_MAX": "4"})
    assert "MALLOC_ARENA_MAX" not in r["applied"] and "MALLOC_MMAP_THRESHOLD_" in r["applied"]
    r = run_fragment("tuned", **{**clean_env(), "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert r["applied"] == {}


def test_the_service_tunes_malloc_before_loading_models_unless_turned_off(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    calls = []
    monkeypatch.setattr(malloc, "tune", lambda: calls.append("tune") or {})
    for enabled in (True, False):
        settings = Settings(model_dir=tmp_path, malloc_tuning=enabled, warmup=False)
        with TestClient(create_app(settings)):
            pass
    assert calls == ["tune"]
