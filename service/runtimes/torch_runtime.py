"""The eager PyTorch runtime: a thin adapter over ``models.bundle.ModelBundle``."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from torch import Tensor

from models.bundle import Conditioning, ModelBundle
from models.text import load_text_encoder
from service.runtimes.base import Runtime

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
    name = "torch"

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.config = bundle.config
        self.sampler = bundle.sampler
        self.sample_rate = bundle.codec.sample_rate
        self.latent_dim = bundle.codec.latent_dim

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> "TorchRuntime":
        config = json.loads((Path(path) / "config.json").read_text())
        encoder = shared_text_encoder(config.get("text_encoder") or {"name": "minilm"}, device)
        return cls(ModelBundle.load(path, device=device, text_encoder=encoder))

    def latent_frames(self, duration: float) -> int:
        return self.bundle.latent_frames(duration)

    def encode_text(self, prompts: list[str], durations: list[float]) -> Conditioning:
        return self.bundle.conditioning(prompts, durations)

    def predict_x0(self, z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor, frame_mask: Tensor) -> Tensor:
        return self.bundle.predict_x0(z, t, cond, guidance, frame_mask)

    def decode(self, latents: list[Tensor], durations: list[float]) -> list[Tensor]:
        return self.bundle.decode(latents, durations)

    def initial_noise(self, seed: int, frames: int):
        return self.bundle.initial_noise(seed, frames)
