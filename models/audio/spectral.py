"""Spectral utilities shared by the autoencoder, its losses and the evaluation metrics."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_WINDOWS: dict[tuple[int, str, torch.dtype], Tensor] = {}


def hann(n_fft: int, device, dtype=torch.float32) -> Tensor:
    key = (n_fft, str(device), dtype)
    if key not in _WINDOWS:
        _WINDOWS[key] = torch.hann_window(n_fft, device=device, dtype=dtype)
    return _WINDOWS[key]


def stft(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """Complex STFT of [..., N] -> [..., n_fft // 2 + 1, frames] (centred, Hann)."""
    shape = x.shape
    spec = torch.stft(x.reshape(-1, shape[-1]), n_fft, hop, window=hann(n_fft, x.device, x.dtype), center=True,
                      return_complex=True)
    return spec.reshape(shape[:-1] + spec.shape[-2:])


def istft(spec: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    shape = spec.shape
    out = torch.istft(spec.reshape((-1,) + shape[-2:]), n_fft, hop, window=hann(n_fft, spec.device, torch.float32),
                      center=True, length=length)
    return out.reshape(shape[:-2] + (length,))


def wrap_phase(x: Tensor) -> Tensor:
    """Principal value in (-pi, pi]."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


RESOLUTIONS = ((4096, 1024), (2048, 512), (1024, 256), (512, 128), (256, 64))


def multi_resolution_stft_distance(x: Tensor, y: Tensor, resolutions=RESOLUTIONS, eps: float = 1e-5,
                                   pooled: bool = False) -> Tensor:
    """Multi-resolution STFT distance of x to the reference y: spectral convergence + mean |log magnitude
    difference|, averaged over resolutions. x, y: [..., N]. Returns a per-item tensor [...], or with
    ``pooled`` a scalar whose spectral convergence is taken over the whole batch (a training loss that stays
    finite when one item is silent)."""
    total = 0.0
    for n_fft, hop in resolutions:
        mx = stft(x, n_fft, hop).abs()
        my = stft(y, n_fft, hop).abs()
        if pooled:
            sc = torch.linalg.vector_norm(my - mx) / torch.linalg.vector_norm(my).clamp(min=eps)
            lm = (torch.log(mx + eps) - torch.log(my + eps)).abs().mean()
        else:
            sc = torch.linalg.vector_norm(my - mx, dim=(-2, -1)) / torch.linalg.vector_norm(my, dim=(-2, -1)).clamp(min=eps)
            lm = (torch.log(mx + eps) - torch.log(my + eps)).abs().mean(dim=(-2, -1))
        total = total + sc + lm
    return total / len(resolutions)


def si_sdr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SDR in dB over the last axis."""
    reference = reference - reference.mean(-1, keepdim=True)
    estimate = estimate - estimate.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    n = x.shape[-1]
    target = -(-n // multiple) * multiple
    return F.pad(x, (0, target - n)) if target != n else x
