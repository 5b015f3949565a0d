"""Noise schedules of continuous time t in [0, 1]: z_t = alpha(t) x0 + sigma(t) eps.

t = 0 is data, t = 1 is noise. Every function takes a tensor of any shape and works elementwise,
so callers pass per-sample times.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class NoiseSchedule(ABC):
    name: str

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) for times t."""

    @abstractmethod
    def logsnr(self, t: Tensor) -> Tensor:
        """log(alpha_t^2 / sigma_t^2)."""

    @abstractmethod
    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of logsnr(t)."""

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[1]

    def snr(self, t: Tensor) -> Tensor:
        return torch.exp(self.logsnr(t))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return _bc(a, x0) * x0 + _bc(s, x0) * eps

    def to_config(self) -> dict:
        return {"name": self.name}


def _bc(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample tensor [B] against a batch tensor [B, ...]."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


class VPCosineSchedule(NoiseSchedule):
    """Variance-preserving cosine schedule of Salimans & Ho, written through its logSNR:
    lambda(t) = -2 log(tan(a t + b)), alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""

    name = "vp-cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        self.logsnr_min = logsnr_min
        self.logsnr_max = logsnr_max
        self.b = math.atan(math.exp(-logsnr_max / 2))
        self.a = math.atan(math.exp(-logsnr_min / 2)) - self.b

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(self.a * t + self.b))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-logsnr / 2)) - self.b) / self.a

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.logsnr(t)
        return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))

    def to_config(self) -> dict:
        return {"name": self.name, "logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow: z_t = (1 - t) x0 + t eps, SNR = ((1 - t) / t)^2 (Stable Audio Open Small)."""

    name = "rectified-flow"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - t, t

    def logsnr(self, t: Tensor) -> Tensor:
        t = t.clamp(1e-12, 1 - 1e-12)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-logsnr / 2)
