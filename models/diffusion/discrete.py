"""The discrete DDPM noise table of UNet checkpoints (Tango, AudioLDM, Stable Diffusion) as a continuous-time
``NoiseSchedule``, so the project's samplers drive these models unchanged. Its config (``to_config``) is the
scheduler config's own keys, so ``make_schedule`` rebuilds the same table (an exported model's runtime does).

Time t in [0, 1] maps to the fractional training step tau = T t - 1 (T training steps): t = 1 is the last step
(tau = T - 1), t = 0 is clean data (tau = -1, alpha_bar = 1). alpha_bar is the reference's float32 table,
interpolated linearly between integer steps. On this map the project's uniform DDIM grid t_i = 1 - i / N visits
exactly diffusers' "trailing" timesteps T (1 - i / N) - 1 when N divides T, and its last step lands on clean data
like ``set_alpha_to_one=True``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from models.diffusion.schedules import NoiseSchedule


def betas_from_config(cfg: dict, source: str) -> Tensor:
    """The beta table of a diffusers scheduler config (DDPM/DDIM/...), computed the way diffusers does (float32)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(cfg.get("beta_start", 1e-4) ** 0.5, cfg.get("beta_end", 0.02) ** 0.5, n,
                               dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        def abar(x: float) -> float:
            return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise ValueError(f"{source}: beta_schedule {kind!r} is not supported "
                              "(linear, scaled_linear, squaredcos_cap_v2 or trained_betas)")
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so that the last step has zero SNR, keeping the first."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class DiscreteVPSchedule(NoiseSchedule):
    name = "ddpm-discrete"

    def __init__(self, alphas_cumprod: Tensor, config: dict | None = None):
        self.steps = int(alphas_cumprod.numel())
        # index tau + 1: entry 0 is clean data (alpha_bar = 1), entry k is training step k - 1
        self.table = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.double()])
        self._config = dict(config or {})

    @classmethod
    def from_scheduler_config(cls, cfg: dict, source: str) -> DiscreteVPSchedule:
        betas = betas_from_config(cfg, source)
        return cls(torch.cumprod(1.0 - betas, dim=0), {k: cfg[k] for k in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr", "trained_betas")
            if cfg.get(k) is not None})

    def _position(self, t: Tensor) -> Tensor:
        """tau + 1 in [0, T]; grid points within float32 rounding of an integer step are that step exactly."""
        pos = (t.double() * self.steps).clamp(0, self.steps)
        return torch.where((pos - pos.round()).abs() < 1e-3, pos.round(), pos)

    def alpha_bar(self, t: Tensor) -> Tensor:
        pos = self._position(t)
        table = self.table.to(pos.device)
        lo = pos.floor().clamp(max=self.steps - 1).long()
        w = pos - lo
        return table[lo] * (1 - w) + table[lo + 1] * w

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alpha_bar(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return ab.sqrt().to(dtype), (1 - ab).clamp(min=0).sqrt().to(dtype)

    def logsnr(self, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t)
        return (ab.log() - torch.log1p(-ab)).to(t.dtype if t.is_floating_point() else torch.float32)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of logsnr by interpolation on the (decreasing) alpha_bar table."""
        ab = torch.sigmoid(logsnr.double())
        table = self.table.to(ab.device)
        rev = table.flip(0)  # increasing
        idx = torch.searchsorted(rev, ab.clamp(rev[0], rev[-1])).clamp(1, self.steps)
        a0, a1 = rev[idx - 1], rev[idx]
        frac = ((ab - a0) / (a1 - a0).clamp(min=1e-300)).clamp(0, 1)
        pos_rev = (idx - 1) + frac  # position in the reversed table
        return ((self.steps - pos_rev) / self.steps).to(logsnr.dtype)

    def model_timestep(self, t: Tensor) -> Tensor:
        """The (fractional) training step the network is conditioned on: tau = T t - 1, at least 0."""
        return (self._position(t) - 1).clamp(min=0).float()

    def to_config(self) -> dict:
        return {"name": self.name, **self._config}
