"""Samplers as small math objects: a time grid and a per-sample update rule.

``step`` takes per-sample times ``t`` and ``t_next`` of shape [B], so that samples at different points of
different grids advance together in one batch (the serving scheduler relies on this). Samplers consume the
model's x0 prediction; the parameterisation turns raw network outputs into it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from models.diffusion.schedules import NoiseSchedule, _bc


class Sampler(ABC):
    name: str
    stochastic: bool = False

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    @abstractmethod
    def timesteps(self, n_steps: int, start: float = 1.0) -> Tensor:
        """n_steps + 1 times from ``start`` down to 0 (data), float64 for exact grids. ``start`` < 1 is the grid of
        a sample that begins part-way (audio-to-audio: a clip noised to that level), with the full step count."""

    @abstractmethod
    def step(self, z: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, noise: Tensor | None = None) -> Tensor:
        """Move z from t to t_next given the model's x0 prediction at (z, t)."""


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0) on a uniform grid t_i = i / N:
    z_s = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t; the last step returns x0 itself."""

    name = "ddim"

    def timesteps(self, n_steps: int, start: float = 1.0) -> Tensor:
        check_grid(n_steps, start)
        return torch.linspace(start, 0.0, n_steps + 1, dtype=torch.float64)

    def step(self, z, x0, t, t_next, noise=None):
        a_t, s_t = self.schedule.alpha_sigma(t.to(z.dtype))
        a_s, s_s = self.schedule.alpha_sigma(t_next.to(z.dtype))
        eps = (z - _bc(a_t, z) * x0) / _bc(s_t, z)
        z_next = _bc(a_s, z) * x0 + _bc(s_s, z) * eps
        return torch.where(_bc(t_next, z) <= 0, x0, z_next)

    def x0_for_step(self, z: Tensor, z_next: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """The inverse of ``step`` in x0: the x0 prediction at (z, t) whose DDIM step lands exactly on z_next at
        t_next, x0 = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t) (the progressive-
        distillation target); at t_next = 0 a step returns x0 itself, so the answer is z_next."""
        a_t, s_t = self.schedule.alpha_sigma(t.to(z.dtype))
        a_s, s_s = self.schedule.alpha_sigma(t_next.to(z.dtype))
        ratio = _bc(s_s / s_t, z)
        x0 = (z_next - ratio * z) / (_bc(a_s, z) - ratio * _bc(a_t, z))
        return torch.where(_bc(t_next, z) <= 0, z_next, x0)


class PingPongSampler(Sampler):
    """Ping-pong sampling (the ARC sampler): denoise fully to x0, then re-noise with fresh noise to the next time.
    Grid: half-logSNR l = linspace(-6, 2, N + 1), t = t_of(logsnr = 2 l), t_0 = 1, t_N = 0; for rectified flow
    this is t = sigmoid(-l), as in stable-audio-tools. A grid that starts part-way, at ``start`` < 1, keeps the N
    steps: l = hi - s (hi - lo) for s = linspace(start, 0, N + 1), with t_0 forced to exactly ``start`` (the level
    the starting latents were noised to), as Stable Audio 3's audio-to-audio sampling does."""

    name = "pingpong"
    stochastic = True

    def __init__(self, schedule: NoiseSchedule, half_logsnr_min: float = -6.0, half_logsnr_max: float = 2.0):
        super().__init__(schedule)
        self.lo, self.hi = half_logsnr_min, half_logsnr_max

    def timesteps(self, n_steps: int, start: float = 1.0) -> Tensor:
        check_grid(n_steps, start)
        if start == 1.0:
            half = torch.linspace(self.lo, self.hi, n_steps + 1, dtype=torch.float64)
        else:
            s = torch.linspace(start, 0.0, n_steps + 1, dtype=torch.float64)
            half = self.hi - s * (self.hi - self.lo)
        t = self.schedule.t_from_logsnr(2 * half).clamp(0, 1)
        t[0], t[-1] = start, 0.0
        return t

    def step(self, z, x0, t, t_next, noise=None):
        if noise is None:
            raise ValueError("ping-pong sampling needs fresh noise for every step")
        a_s, s_s = self.schedule.alpha_sigma(t_next.to(z.dtype))
        z_next = _bc(a_s, z) * x0 + _bc(s_s, z) * noise
        return torch.where(_bc(t_next, z) <= 0, x0, z_next)


def check_grid(n_steps: int, start: float) -> None:
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"a grid starts in (0, 1], got {start}")


def make_sampler(name: str, schedule: NoiseSchedule, options: dict | None = None) -> Sampler:
    """The sampler ``name`` on ``schedule``; ``options``: its keyword arguments (``BundleConfig.sampler_options``,
    e.g. a ping-pong grid's ``half_logsnr_min``)."""
    samplers = {DDIMSampler.name: DDIMSampler, PingPongSampler.name: PingPongSampler}
    if name not in samplers:
        raise ValueError(f"unknown sampler {name!r}; expected 'ddim' or 'pingpong'")
    try:
        return samplers[name](schedule, **(options or {}))
    except TypeError as exc:
        raise ValueError(f"sampler {name!r}: bad options {options}: {exc}") from None
