"""Entry points (python -m service, tta serve), settings, and the real zoo teacher when it is there."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from service_support import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "zoo" / "tta-teacher"


def test_settings_from_env(monkeypatch, tmp_path):
    from service.settings import Settings

    defaults = Settings(_env_file=None)
    assert (defaults.host, defaults.port, defaults.default_model, defaults.max_batch, defaults.queue_size,
            defaults.request_timeout, defaults.policy) == ("0.0.0.0", 8000, "tta-bsa-25", 16, 64, 60.0, "continuous")
    assert defaults.model_dir == ROOT / "models" / "zoo" and defaults.api_key_set == frozenset()
    for key, value in {"TTA_PORT": "9001", "TTA_API_KEYS": "a, b", "TTA_POLICY": "request", "TTA_MAX_BATCH": "4",
                       "TTA_MODEL_DIR": str(tmp_path), "TTA_DEVICE": "cuda", "TTA_THREADS": "2"}.items():
        monkeypatch.setenv(key, value)
    s = Settings(_env_file=None)
    assert (s.port, s.api_key_set, s.policy, s.max_batch, s.model_dir, s.device, s.threads) == \
        (9001, frozenset({"a", "b"}), "request", 4, tmp_path, "cuda", 2)
    monkeypatch.setenv("TTA_POLICY", "bogus")
    with pytest.raises(Exception):
        Settings(_env_file=None)


def test_cli_has_serve():
    from service.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8123", "--policy", "none"])
    assert args.command == "serve" and args.port == 8123 and args.policy == "none"
    assert args.func.__name__ == "cmd_serve"


def test_invalid_settings_end_the_process_with_one_line_each_and_no_traceback():
    env = dict(os.environ, TTA_MAX_BATCH="0", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["invalid settings:", "  TTA_MAX_BATCH: Input should be greater than or equal to 1"]
    env = dict(os.environ, TTA_TICK_GRAPHS="true", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "TTA_TICK_GRAPHS" in out.stderr and "needs device cuda" in out.stderr


@pytest.mark.slow
def test_python_m_service(model_dir):
    port = free_port()
    env = dict(os.environ, TTA_HOST="127.0.0.1", TTA_PORT=str(port), TTA_MODEL_DIR=str(model_dir),
               TTA_DEFAULT_MODEL="tiny", TTA_THREADS="1", TTA_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("python -m service did not become ready")
        r = httpx.post(url + "/generate", json={"prompt": "entry point", "duration": 0.5, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.headers["x-model"] == "tiny"
        assert sf.info(io.BytesIO(r.content)).frames == round(0.5 * 44100)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.skipif(not (TEACHER / "denoiser.safetensors").is_file(), reason="models/zoo/tta-teacher not trained yet")
def test_zoo_teacher_serves(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"model_dir": TEACHER.parent, "models": "tta-teacher",
                                                      "default_model": "tta-teacher", "debug_faults": False}),
                     timeout=300)
    try:
        with srv.client(timeout=120) as c:
            info = c.get("/models").json()
            assert [m["name"] for m in info] == ["tta-teacher"]
            r = c.post("/generate", json={"prompt": "a dog barks", "duration": 1.0, "steps": 4, "seed": 3})
            assert r.status_code == 200, r.text
            data, sr = sf.read(io.BytesIO(r.content), dtype="int16")
            assert sr == 44100 and data.shape == (44100, 2)
            bundle = srv.app.state.tta.runtimes["tta-teacher"].bundle
            ref = bundle.pipeline.generate(["a dog barks"], [1.0], [3], steps=4)[0]
            expected = (ref.clamp(-1, 1).T.numpy() * 32767).round()
            assert abs(data.astype(float) - expected).max() <= 2
    finally:
        srv.stop()


def test_zoo_layout_with_shared_codec(base_settings, text_encoder, tmp_path):
    """A zoo like the shipped one: a codec-only directory (skipped as a model) and a model whose config points at
    it with codec_from."""
    import json

    from service_support import build_tiny_bundle

    bundle = build_tiny_bundle("zoo-model", text_encoder, 3)
    codec_dir = tmp_path / "tta-codec"
    bundle.save(codec_dir, save_codec=True)
    (codec_dir / "denoiser.safetensors").unlink()
    (codec_dir / "config.json").write_text(json.dumps({"codec": bundle.codec.to_config()}))
    bundle.config.codec_from = "../tta-codec"
    bundle.save(tmp_path / "zoo-model", save_codec=False)
    srv = LiveServer(base_settings.model_copy(update={"model_dir": tmp_path, "default_model": "zoo-model"}))
    try:
        with srv.client() as c:
            assert [m["name"] for m in c.get("/models").json()] == ["zoo-model"]
            assert c.post("/generate", json={"prompt": "shared codec", "steps": 2}).status_code == 200
    finally:
        srv.stop()
