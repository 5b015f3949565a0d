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
    return _centred(wave.flatten(-2), envelope.flatten(), n_fft, length)


def _centred(wave: Tensor, envelope: Tensor, n_fft: int, length: int) -> Tensor:
    """The overlap-added frames of a centred STFT, divided by the overlap-added squared window and cut to ``length``
    samples from n_fft / 2 on; missing samples at the end are zeros (as torch.istft)."""
    start = n_fft // 2
    wave = wave[..., start: start + length]
    envelope = envelope[start: start + length]
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


# ---------------------------------------------------------------------------------------------------------------
# A real-valued inverse STFT. ONNX has no complex tensors (and torch's ONNX exporters have no iSTFT), so graphs
# that synthesise audio use this instead of ``istft``. It equals ``istft`` up to float rounding, so torch can run
# it too (the tests compare the two).


def _factor(n: int) -> tuple[int, int]:
    """n = n1 * n2 with n1 the largest divisor not above sqrt(n): the two stages of the matrix DFT cost n * (n1 + n2)
    multiply-adds per frame instead of n * n for one dense matrix."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


_IRFFT_PLANS: dict[tuple[int, str, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}


def _irfft_plan(n_fft: int, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Constants of a two-stage (Cooley-Tukey) inverse DFT of a one-sided spectrum with real output.

    With n_fft = N1 * N2, bins k = N2 k1 + k2 and samples n = N1 n2 + n1:
    x[n] = 1/N Re sum_k2 e^(2 pi i k2 n2 / N2) [e^(2 pi i k2 n1 / N) sum_k1 X[k] e^(2 pi i k1 n1 / N1)].
    Stage one (the sum over k1 and the twiddle factor, one real [2 N1, 2 N1] matrix per k2) and stage two (the real
    part of the sum over k2) are matrix products. The full spectrum comes from the one-sided one by Hermitian
    symmetry: a gather, with the conjugation folded into stage one; the imaginary parts of the DC and Nyquist bins
    drop out, as in ``torch.fft.irfft``."""
    key = (n_fft, str(device), dtype)
    if key in _IRFFT_PLANS:
        return _IRFFT_PLANS[key]
    n1, n2 = _factor(n_fft)
    bins = n_fft // 2 + 1
    f64 = torch.float64
    k = torch.arange(n_fft)
    mirrored = k > n_fft // 2
    source = torch.where(mirrored, n_fft - k, k)  # the one-sided bin holding each full-spectrum bin
    full = n2 * torch.arange(n1)[None, :] + torch.arange(n2)[:, None]  # [k2, k1] -> full-spectrum bin
    # rows [k2, (real k1 | imaginary k1)] gathered from the concatenation [real bins | imaginary bins]
    index = torch.cat([source[full], bins + source[full]], dim=1).flatten()
    conj = torch.where(mirrored[full], -1.0, 1.0).to(f64)  # [k2, k1]
    a1 = 2 * math.pi * torch.outer(torch.arange(n1, dtype=f64), torch.arange(n1, dtype=f64)) / n1  # [n1, k1]
    tw = 2 * math.pi * torch.outer(torch.arange(n2, dtype=f64), torch.arange(n1, dtype=f64)) / n_fft  # [k2, n1]
    # Y[n1] = sum_k1 e^(i a1) (re + i s im), then times e^(i tw): angle a1 + tw, one [2 n1, 2 n1] block per k2
    ang = a1[None] + tw[:, :, None]  # [k2, n1, k1]
    c, s = torch.cos(ang), torch.sin(ang)
    sc, ss = s * conj[:, None, :], c * conj[:, None, :]
    stage1 = torch.cat([torch.cat([c, -sc], 2), torch.cat([s, ss], 2)], 1)  # [k2, (Re | Im) n1, (re | im) k1]
    a2 = 2 * math.pi * torch.outer(torch.arange(n2, dtype=f64), torch.arange(n2, dtype=f64)) / n2  # [n2, k2]
    stage2 = torch.stack([torch.cos(a2), -torch.sin(a2)], dim=2).flatten(1) / n_fft  # [n2, (k2, Re | Im)]
    plan = (index.to(device), stage1.to(device, dtype), stage2.to(device, dtype))
    _IRFFT_PLANS[key] = plan
    return plan


def irfft_frames_real(real: Tensor, imag: Tensor, n_fft: int) -> Tensor:
    """Inverse real DFT along the bins of one-sided spectra given as real and imaginary parts
    [..., n_fft // 2 + 1, frames] -> [..., n_fft, frames] (``torch.fft.irfft(real + i imag, n_fft, dim=-2)``)."""
    index, stage1, stage2 = _irfft_plan(n_fft, real.device, real.dtype)
    n2 = stage2.shape[0]
    n1 = n_fft // n2
    frames = real.shape[-1]
    x = torch.cat([real, imag], dim=-2).index_select(-2, index)  # [..., (k2, re | im, k1), F]
    y = stage1 @ x.unflatten(-2, (n2, 2 * n1))  # [..., k2, (Re | Im, n1), F]
    y = y.unflatten(-2, (2, n1)).flatten(-4, -3).flatten(-2)  # [..., (k2, Re | Im), (n1, F)]
    return (stage2 @ y).unflatten(-1, (n1, frames)).flatten(-3, -2)  # [..., (n2, n1), F]: sample n2 N1 + n1


def overlap_add(frames: Tensor, hop: int) -> Tensor:
    """Frames as columns [..., n, F] -> [..., (F - 1) * hop + n], frame f added at offset f * hop."""
    n, count = frames.shape[-2:]
    if n % hop == 0:  # n / hop shifted copies of [hop, F] blocks: linear in the output length
        r = n // hop
        blocks = frames.unflatten(-2, (r, hop))  # [..., r, hop, F]
        out = F.pad(blocks[..., 0, :, :], (0, r - 1))  # [..., hop, F + r - 1]
        for j in range(1, r):
            out = out + F.pad(blocks[..., j, :, :], (j, r - 1 - j))
        return out.transpose(-1, -2).flatten(-2)
    lead = frames.shape[:-2]
    eye = torch.eye(n, dtype=frames.dtype, device=frames.device)[:, None, :]  # [n, 1, n]
    out = F.conv_transpose1d(frames.reshape((-1, n, count)), eye, stride=hop)
    return out.reshape(lead + out.shape[-1:])


def istft_real(real: Tensor, imag: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    """``istft`` (centred, Hann, one-sided) of the spectrum real + i imag, [..., n_fft // 2 + 1, frames] ->
    [..., length], with real-valued tensor operations only: matrix inverse DFT, windowing, overlap-add and
    division by the overlap-added squared window (the least-squares inverse of the windowed STFT, as torch's)."""
    window = hann(n_fft, real.device, real.dtype)[:, None]
    frames = irfft_frames_real(real, imag, n_fft) * window
    wave = overlap_add(frames, hop)
    # expand_as (not expand(n_fft, frames)): an ONNX trace keeps the frame count dynamic only through a tensor
    envelope = overlap_add((window * window).expand_as(frames[(0,) * (frames.dim() - 2)]), hop)
    return _centred(wave, envelope, n_fft, length)
