"""Per-model isolation at load: a broken model directory is reported and the others serve; the service is ready
when the models it must serve are up."""
from __future__ import annotations

import shutil

import pytest

from service_support import TINY, TINY_ARC, LiveServer


@pytest.fixture(scope="module")
def zoo_with_broken_models(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-zoo")
    for name in (TINY, TINY_ARC):
        shutil.copytree(model_dir / name, root / name)
    for name, damage in (("cut-config", "config"), ("empty-config", "empty"), ("cut-weights", "weights")):
        shutil.copytree(model_dir / TINY, root / name)
        if damage == "config":
            text = (root / name / "config.json").read_text()
            (root / name / "config.json").write_text(text[: len(text) // 2])
        elif damage == "empty":
            (root / name / "config.json").write_text("{}")
        else:
            data = (root / name / "denoiser.safetensors").read_bytes()
            (root / name / "denoiser.safetensors").write_bytes(data[:100])
    return root


def test_a_broken_model_directory_is_reported_and_the_others_serve(base_settings, zoo_with_broken_models):
    srv = LiveServer(base_settings.model_copy(update={"model_dir": zoo_with_broken_models, "warmup": False}))
    try:
        with srv.client() as c:
            assert c.get("/health/ready").json()["models"] == [TINY, TINY_ARC]
            models = {m["name"]: m for m in c.get("/models").json()}
            assert models[TINY]["status"] == "ready"
            failed = {name: m["error"] for name, m in models.items() if m["status"] == "failed"}
            assert set(failed) == {"cut-config", "empty-config", "cut-weights"}
            assert "cut-config/config.json: not valid JSON" in failed["cut-config"]
            assert "empty-config/config.json" in failed["empty-config"] and "'name'" in failed["empty-config"]
            assert "cut-weights/denoiser.safetensors: not a readable safetensors file" in failed["cut-weights"]
            assert c.post("/generate", json={"prompt": "a bell", "steps": 2}).status_code == 200
            r = c.post("/generate", json={"prompt": "a bell", "model": "cut-weights"})
            assert r.status_code == 404
        assert srv.metric("tta_model_loaded", model="cut-weights") == 0
    finally:
        srv.stop()


def test_a_required_model_that_fails_keeps_the_service_not_ready(base_settings, zoo_with_broken_models):
    srv = LiveServer(base_settings.model_copy(update={"model_dir": zoo_with_broken_models, "warmup": False,
                                                      "models": f"{TINY},cut-weights"}), wait_ready=False)
    try:
        with srv.client() as c:
            import time

            deadline = time.monotonic() + 60
            while srv.app.state.tta.load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            r = c.get("/health/ready")
            assert r.status_code == 503 and "'cut-weights'" in r.json()["error"]["message"]
            assert "failed to load" in r.json()["error"]["message"]
    finally:
        srv.stop()
