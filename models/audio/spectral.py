"""Spectral utilities shared by the autoencoder, its losses and the evaluation metrics."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_WINDOWS: dict[tuple[int, str, torch.dtype], Tensor] = {}


def hann(n_fft: int, device, dtype=torch.float32) -> Tensor:
    """The cached Hann window; made outside inference mode, so that a window first asked for by the service (which
    runs in inference mode) can still be saved for backward by training in the same process."""
    key = (n_fft, str(device), dtype)
    if key not in _WINDOWS:
        with torch.inference_mode(False):
            _WINDOWS[key] = torch.hann_window(n_fft, device=device, dtype=dtype)
    return _WINDOWS[key]


def stft(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """Complex STFT of [..., N] -> [..., n_fft // 2 + 1, frames] (centred, Hann)."""
    shape = x.shape
    spec = torch.stft(x.reshape(-1, shape[-1]), n_fft, hop, window=hann(n_fft, x.device, x.dtype), center=True,
                      return_complex=True)
    return spec.reshape(shape[:-1] + spec.shape[-2:])


def istft(spec: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    """Inverse of ``stft`` [..., n_fft // 2 + 1, frames] -> [..., length]: the least-squares inverse (windowed
    overlap-add divided by the overlap-added squared window), as torch.istft computes it. With hop dividing n_fft
    (every STFT here) the frames are inverse-transformed as rows and overlap-added in place as n_fft / hop shifted
    blocks, about twice as fast on a CPU as torch.istft; other hops go to torch.istft."""
    window = hann(n_fft, spec.device, spec.real.dtype)
    if n_fft % hop:
        shape = spec.shape
        out = torch.istft(spec.reshape((-1,) + shape[-2:]), n_fft, hop, window=window, center=True, length=length)
        return out.reshape(shape[:-2] + (length,))
    count, r = spec.shape[-1], n_fft // hop
    blocks = (torch.fft.irfft(spec.transpose(-1, -2), n=n_fft, dim=-1) * window).unflatten(-1, (r, hop))
    wave = blocks.new_zeros(blocks.shape[:-3] + (count + r - 1, hop))  # [..., F, r, hop] -> [..., F + r - 1, hop]
    envelope = blocks.new_zeros(count + r - 1, hop)
    squared = (window * window).view(r, hop)
    for j in range(r):
        wave[..., j: j + count, :] += blocks[..., j, :]
        envelope[j: j + count] += squared[j]
    # centred frames: the signal starts n_fft / 2 in; samples past the last frame are zeros (as torch.istft)
    start = n_fft // 2
    wave = wave.flatten(-2)[..., start: start + length]
    envelope = envelope.flatten()[start: start + length]
    if wave.shape[-1] < length:
        wave = F.pad(wave, (0, length - wave.shape[-1]))
        envelope = F.pad(envelope, (0, length - envelope.shape[-1]), value=1.0)
    return wave / envelope.clamp(min=1e-11)


def wrap_phase(x: Tensor) -> Tensor:
    """Principal value in (-pi, pi]."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


RESOLUTIONS = ((4096, 1024), (2048, 512), (1024, 256), (512, 128), (256, 64))


def multi_resolution_stft_distance(x: Tensor, y: Tensor, resolutions=RESOLUTIONS, eps: float = 1e-5,
                                   pooled: bool = False, item_dims: int = 1) -> Tensor:
    """Multi-resolution STFT distance of x to the reference y: spectral convergence + mean |log magnitude
    difference|, averaged over resolutions. x, y: [..., N]. Returns a per-item tensor, an item being the last
    ``item_dims`` axes (1: each channel alone; 2: a [C, N] clip as a whole, so that a channel that is silent in the
    reference, as in a hard-panned clip, does not put a near-zero norm under the spectral convergence), or with
    ``pooled`` a scalar whose spectral convergence is taken over the whole batch (a training loss that stays
    finite when one item is silent)."""
    total = 0.0
    dims = tuple(range(-item_dims - 1, 0))  # the STFT adds a frequency axis
    for n_fft, hop in resolutions:
        mx = stft(x, n_fft, hop).abs()
        my = stft(y, n_fft, hop).abs()
        if pooled:
            sc = torch.linalg.vector_norm(my - mx) / torch.linalg.vector_norm(my).clamp(min=eps)
            lm = (torch.log(mx + eps) - torch.log(my + eps)).abs().mean()
        else:
            sc = torch.linalg.vector_norm(my - mx, dim=dims) / torch.linalg.vector_norm(my, dim=dims).clamp(min=eps)
            lm = (torch.log(mx + eps) - torch.log(my + eps)).abs().mean(dim=dims)
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
