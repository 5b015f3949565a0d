"""The runtime interface: what the engine needs from a model, nothing more.

A runtime executes; it never decides. The scheduler only needs text encoding, ONE batched ``predict_x0`` per tick
(per-sample t, guidance and frame mask), the sampler's per-sample math, the noise recipe and a batched decode.
ONNX Runtime / TensorRT runtimes implement the same methods around exported graphs; the sampler math and the noise
recipe stay in torch on the CPU so that seeds mean the same thing whatever the runtime.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from models.bundle import BundleConfig, Conditioning, initial_noise
from models.diffusion import Sampler


class Runtime(ABC):
    name: str  # runtime name reported by /models and tta_model_loaded ("torch", "onnxruntime", ...)
    config: BundleConfig
    sampler: Sampler
    sample_rate: int
    latent_dim: int

    @property
    def model_name(self) -> str:
        return self.config.name

    @abstractmethod
    def latent_frames(self, duration: float) -> int: ...

    @abstractmethod
    def encode_text(self, prompts: list[str], durations: list[float]) -> Conditioning:
        """Batched text encoding; the result is per-sample independent of its batch companions."""

    @abstractmethod
    def predict_x0(self, z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor, frame_mask: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, latents: list[Tensor], durations: list[float]) -> list[Tensor]:
        """Latents [C, T_i] -> float waveforms [2, round(duration * sample_rate)] on the CPU."""

    def prepare(self) -> None:
        """Work to do once before serving (the service's warm-up calls it): nothing, unless a runtime has some."""

    def initial_noise(self, seed: int, frames: int) -> tuple[Tensor, torch.Generator]:
        """Per-request noise: ``models.bundle.initial_noise``, the recipe ``ModelBundle`` uses (CPU generator seeded
        with the seed); per-step noise of stochastic samplers is drawn from the returned generator, one [C, frames]
        tensor a step."""
        return initial_noise(self.config, self.latent_dim, seed, frames)

    def step_noise(self, generator: torch.Generator, frames: int) -> Tensor:
        return torch.randn(self.latent_dim, frames, generator=generator)
