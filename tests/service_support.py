"""Shared helpers for the service tests: tiny real model directories and a real uvicorn server in a thread."""
from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
from training_support import tiny_codec

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.dit import DiT, DiTConfig
from models.layers import fill_zero_parameters

TINY = "tiny"
TINY_ARC = "tiny-arc"


def build_tiny_bundle(name: str, text_encoder, seed: int, **config) -> ModelBundle:
    torch.manual_seed(seed)
    cfg = BundleConfig(name=name, default_steps=4, max_steps=50, max_duration=4.0, default_duration=1.0, **config)
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, text_dim=384, pooled_dim=384))
    fill_zero_parameters(dit, 0.05)  # outputs depend on the text, time, guidance and seed
    codec = tiny_codec()
    with torch.no_grad():  # audible, unclipped output: a noise floor of about 0.02 rms instead of near silence
        codec.dec_out.bias[-2 * codec.config.noise_bands:] = math.log(0.5)
    return ModelBundle(cfg, dit, codec, text_encoder)


def build_model_dir(root: Path, text_encoder) -> Path:
    build_tiny_bundle(TINY, text_encoder, 0).save(root / TINY, save_codec=True)
    build_tiny_bundle(TINY_ARC, text_encoder, 1, kind="arc", sampler="pingpong",
                      schedule={"name": "rectified-flow"}, default_guidance=1.0).save(root / TINY_ARC, save_codec=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app(settings)`` under a real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, settings, wait_ready: bool = True, timeout: float = 120.0):
        import uvicorn

        from service.__main__ import uvicorn_config
        from service.app import create_app

        self.port = free_port()
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings))  # as python -m service runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + ("/health/ready" if wait_ready else "/health/live"), timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"server did not become ready: {self.app.state.tta.load_error}")

    @property
    def engine(self):
        return self.app.state.tta.engine

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample from /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


# ------------------------------------------------------------------------------------------ runtime parity
def run_jobs(runtime, jobs: list[dict]) -> list:
    """The jobs through the real engine (all admitted in one tick, so they share every forward)."""
    from service.engine import Engine
    from service.metrics import Metrics
    from service.jobs import GenerationJob

    engine = Engine({runtime.model_name: runtime}, Metrics(), max_batch=16)
    results: dict[int, tuple] = {}
    done = threading.Event()
    for i, spec in enumerate(jobs):
        def on_done(result, error, i=i):
            results[i] = (result, error)
            if len(results) == len(jobs):
                done.set()
        engine.submit(GenerationJob(id=f"job{i}", model=runtime.model_name, on_done=on_done,
                                    deadline=time.monotonic() + 60, **spec))
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.stop()
    for _, error in results.values():
        assert error is None, error
    return [results[i][0] for i in range(len(jobs))]


# Per runtime (a TensorRT fp16 runtime will need its own): the latents (text encoder + denoiser + guidance batching
# + sampler) to max_rel, and the audio sample by sample (rms_rel) and on STFT magnitudes (spectral_rel). Measured
# for onnxruntime: latents <= 1.2e-6, audio <= 6e-4 rms; the decoder's own tolerance (1 %) bounds the audio.
PARITY = {"onnxruntime": {"latents_max_rel": 1e-4, "audio_rms_rel": 1e-2, "audio_spectral_rel": 1e-2}}


def compare_runtimes(path, jobs) -> None:
    """A checkpoint directory served by onnxruntime (exported) and by eager torch: same latents and audio."""
    from models.export.parity import max_rel_error, rms_rel_error
    from service.runtimes import load_runtime

    candidate, reference = load_runtime(path, "onnxruntime"), load_runtime(path, "torch")
    assert (candidate.name, reference.name, load_runtime(path, "auto").name) == ("onnxruntime", "torch", "torch")
    assert candidate.config == reference.bundle.config
    tol = PARITY["onnxruntime"]
    for spec, a, b in zip(jobs, run_jobs(reference, jobs), run_jobs(candidate, jobs)):
        assert b.wave.shape == a.wave.shape and a.wave.abs().max() > 1e-4
        assert max_rel_error(b.latents, a.latents) <= tol["latents_max_rel"], spec
        assert rms_rel_error(b.wave, a.wave) <= tol["audio_rms_rel"], spec


def derived_student(checkpoint: Path, out: Path, factor: float, **config) -> Path:
    """A student derived from a checkpoint directory: its denoiser's weights scaled by ``factor``, saved in the
    ``derived`` format over the checkpoint (``config``: the serving fields it changes)."""
    import copy

    from models.checkpoints import format_derived, load_checkpoint_dir

    base = load_checkpoint_dir(checkpoint)
    student = copy.deepcopy(base.denoiser)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(factor)
    return format_derived.save(base, student, out, **config)
