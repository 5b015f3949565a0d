"""The PyTorch runtime: a thin adapter over ``models.bundle.ModelBundle``, eager by default. Two options apply to
the denoiser, the part that runs once per step: ``compile`` (``torch.compile`` with dynamic shapes, so that batch
size and length changes do not recompile; ``prepare``, called before the service is ready, compiles the two graphs
that serving needs) and ``precision`` (autocast to bfloat16 or float16 for its matrix products; the sampler's maths,
the noise and the decoder stay float32). On a CUDA device, ``cuda_graphs`` replays the denoiser's forward from
captured CUDA graphs (``service.runtimes.cuda_graphs``); it excludes ``compile``."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.text import TextEmbedding, load_text_encoder
from service.runtimes.base import Runtime
from service.runtimes.cuda_graphs import use_cuda_graphs

log = logging.getLogger("tta.runtimes")

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ENCODERS: dict[str, object] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_text_encoder(config: dict, device: str):
    """One (cached) text encoder per (config, device) in the process: models that use the same encoder share its
    weights and its prompt-embedding cache."""
    key = json.dumps(config, sort_keys=True) + "@" + device
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = load_text_encoder(config, device=device)
        return _ENCODERS[key]


class TorchRuntime(Runtime):
    """The bundle's networks, with the denoiser optionally compiled, autocast or replayed from CUDA graphs."""

    name = "torch"

    def __init__(self, bundle: ModelBundle, compile: bool = False, precision: str = "float32",
                 cuda_graphs: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
        if compile and cuda_graphs:
            raise ValueError("choose torch.compile or CUDA graphs for the denoiser, not both")
        self.bundle = bundle
        self.config = bundle.config
        self.schedule = bundle.schedule
        self.device = bundle.device
        self.sample_rate = bundle.sample_rate
        self.samples_per_latent = bundle.samples_per_latent
        self.latent_dim = bundle.latent_dim
        self.precision, self.compiled, self.cuda_graphs = precision, bool(compile), bool(cuda_graphs)
        if compile:
            compile_denoiser(bundle)
        if cuda_graphs:
            use_cuda_graphs(bundle)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", **options) -> TorchRuntime:
        config = BundleConfig.load(Path(path) / "config.json")
        encoder = shared_text_encoder(config.text_encoder or {"name": "minilm"}, device)
        return cls(ModelBundle.load(path, device=device, text_encoder=encoder), **options)

    def prepare(self) -> None:
        """With ``compile``: compile before serving. torch.compile specialises a batch of one apart from larger
        ones, so both are run once here (a short clip; lengths are dynamic), instead of the first batched tick
        compiling under load (a minute or more on a small CPU). Under inference mode, as the engine runs: the
        compiled graphs are guarded on it."""
        if not self.compiled:
            return
        t0 = time.perf_counter()
        duration = min(1.0, self.config.max_duration)
        frames = self.latent_frames(duration)
        with torch.inference_mode():
            for batch in (1, 2):
                text = self.encode_text(["warm-up"] * batch)
                self.denoise(torch.randn(batch, self.latent_dim, frames), torch.full((batch,), 0.5), text.tokens,
                             text.mask, text.pooled, torch.full((batch,), duration),
                             torch.ones(batch, frames, dtype=torch.bool))
        log.info("compiled denoiser ready", extra={"model": self.model_name,
                                                   "seconds": round(time.perf_counter() - t0, 1)})

    def latent_frames(self, duration: float) -> int:
        return self.bundle.latent_frames(duration)

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.bundle.encode_text(prompts)

    def unconditional_text(self, n: int) -> TextEmbedding:
        return self.bundle.unconditional_text(n)

    def denoise(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, guidance: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        args = (z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance, local_cond)
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return self.bundle.denoise(*args)
        # autocast's cache of cast weights must stay off while a CUDA graph is captured (cuda_graphs)
        with torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.cuda_graphs):
            return self.bundle.denoise(*args)

    def encode_audio(self, wave: Tensor) -> Tensor:
        return self.bundle.encode_audio(wave)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.bundle.decode_latents(latents)


def compile_denoiser(bundle) -> None:
    """``torch.compile`` the bundle's denoiser in place (dynamic shapes). A denoiser that loops over lengths in
    Python (``runs_per_length``: a UNet) has its network compiled instead, so the loop stays eager."""
    denoiser = bundle.denoiser
    if getattr(denoiser, "runs_per_length", False):
        denoiser.unet = torch.compile(denoiser.unet, dynamic=True)
    else:
        bundle.denoiser = torch.compile(denoiser, dynamic=True)
    log.info("denoiser compiled with torch.compile", extra={"model": bundle.config.name})
