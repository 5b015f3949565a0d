"""Small building blocks shared by the networks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvNeXtBlock1d(nn.Module):
    """Depthwise conv -> LayerNorm -> pointwise MLP, residual with a learned layer scale."""

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 3, layer_scale: float = 1e-2):
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, expansion * dim)
        self.pw2 = nn.Linear(expansion * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, T]
        h = self.dw(x).transpose(1, 2)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.scale * h).transpose(1, 2)


def fourier_features(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a per-sample scalar [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@torch.no_grad()
def fill_zero_parameters(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Give every all-zero parameter of ``module`` normal(0, ``std``) values (from ``generator``, or torch's global
    generator). A DiT's adaLN-Zero and output layers start at zero, which makes an untrained denoiser a constant; the
    tests, exports and benchmarks that use random weights need outputs that depend on every input, as a trained
    model's do."""
    for p in module.parameters():
        if p.abs().sum() == 0:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
