"""Clip embeddings no one here trained, and the Frechet distance between two sets of them.

* :func:`mfcc` / :func:`mfcc_embedding`: mel-frequency cepstral coefficients (power STFT, triangular mel filterbank
  on the HTK mel scale, natural log, orthonormal DCT-II), and a clip's mean over frames.
* :func:`shrunk_covariance`: a covariance estimate that stays well conditioned with few clips: the sample covariance
  shrunk towards its own diagonal with the Ledoit-Wolf-type intensity of Schafer & Strimmer (2005, target "D"),
  estimated from the data (or a fixed intensity).
* :func:`frechet_distance`: ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2``, computed on the symmetric
  positive semi-definite form with eigendecompositions (no complex intermediate, negative rounding eigenvalues
  clipped), or as in the FID reference code with ``scipy.linalg.sqrtm(S1 S2)`` (tiny imaginary parts discarded).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.linalg
from scipy.fft import dct

from .pitch import to_mono


# ----------------------------------------------------------------------------------------------------------- MFCC
def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 20.0, fmax: float | None = None
                   ) -> np.ndarray:
    """Triangular filters [n_mels, n_fft // 2 + 1] with centres equally spaced in mel, peak 1 (HTK style)."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    fb.setflags(write=False)
    return fb


def mfcc(audio: np.ndarray, sample_rate: int, n_mfcc: int = 20, n_mels: int = 64, n_fft: int = 2048,
         hop: int = 512, fmin: float = 20.0, fmax: float | None = None, floor: float = 1e-10) -> np.ndarray:
    """MFCCs [frames, n_mfcc] of the mono mix: |STFT|^2 (Hann, centred, reflect-padded) -> mel filterbank ->
    log(max(., floor)) -> DCT-II (orthonormal) over the mel axis, first ``n_mfcc`` coefficients (c0 included)."""
    x = to_mono(audio)
    if len(x) < 2:
        raise ValueError("clip too short for an MFCC frame")
    pad = n_fft // 2
    x = np.pad(x, (pad, pad), mode="reflect" if len(x) > pad else "constant")
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power @ mel_filterbank(int(sample_rate), n_fft, n_mels, fmin, fmax).T
    return dct(np.log(np.maximum(mel, floor)), type=2, norm="ortho", axis=1)[:, :n_mfcc]


def mfcc_embedding(audio: np.ndarray, sample_rate: int, **kw) -> np.ndarray:
    """A clip's MFCC statistics: the mean over frames [n_mfcc]."""
    return mfcc(audio, sample_rate, **kw).mean(axis=0)


# ------------------------------------------------------------------------------------------- Gaussian statistics
def shrinkage_intensity(x: np.ndarray) -> float:
    """Schafer & Strimmer's (2005) estimate of the optimal intensity for shrinking the unbiased sample covariance
    of ``x`` [n, d] towards its diagonal: sum_{i!=j} Var(s_ij) / sum_{i!=j} s_ij^2, clipped to [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 2 or x.shape[1] < 2:
        return 0.0
    xc = x - x.mean(axis=0)
    w_mean = xc.T @ xc / n  # mean over samples of w_kij = x_ki x_kj
    s = w_mean * n / (n - 1)
    # sum_k (w_kij - w_mean_ij)^2 = sum_k x_ki^2 x_kj^2 - n w_mean_ij^2
    sq = xc ** 2
    var_w = (sq.T @ sq - n * w_mean ** 2) * n / (n - 1) ** 3
    off = ~np.eye(x.shape[1], dtype=bool)
    denom = float(np.sum(s[off] ** 2))
    if denom <= 0.0:
        return 1.0
    return float(np.clip(np.sum(np.maximum(var_w[off], 0.0)) / denom, 0.0, 1.0))


def shrunk_covariance(x: np.ndarray, shrinkage: float | str = "auto") -> tuple[np.ndarray, float]:
    """(covariance [d, d], intensity used): (1 - lam) S + lam diag(S) with S the unbiased sample covariance of
    ``x`` [n, d]; ``shrinkage`` "auto" estimates lam (:func:`shrinkage_intensity`), a number fixes it (0: plain S).
    One sample gives a zero covariance."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("expected samples [n, d]")
    if x.shape[0] < 2:
        return np.zeros((x.shape[1], x.shape[1])), 0.0
    s = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    lam = shrinkage_intensity(x) if shrinkage == "auto" else float(shrinkage)
    if not 0.0 <= lam <= 1.0:
        raise ValueError("shrinkage must be 'auto' or in [0, 1]")
    cov = (1.0 - lam) * s
    cov[np.diag_indices_from(cov)] = np.diag(s)
    return cov, lam


def gaussian_stats(x: np.ndarray, shrinkage: float | str = "auto") -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, covariance, shrinkage intensity) of samples [n, d]."""
    x = np.asarray(x, dtype=np.float64)
    cov, lam = shrunk_covariance(x, shrinkage)
    return x.mean(axis=0), cov, lam


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray, method: str = "eigh") -> float:
    """tr (cov1 cov2)^1/2 for covariances (symmetric PSD)."""
    if method == "eigh":
        # (cov1 cov2)^1/2 is similar to (s1 cov2 s1)^1/2 with s1 = cov1^1/2: same trace, and the latter is the
        # square root of a symmetric PSD matrix, i.e. the sum of the square roots of its eigenvalues
        s1 = _psd_sqrt(cov1)
        m = s1 @ cov2 @ s1
        w = np.linalg.eigvalsh((m + m.T) / 2.0)
        return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
    if method == "sqrtm":
        prod = cov1 @ cov2
        root = scipy.linalg.sqrtm(prod)
        if not np.all(np.isfinite(root)):  # singular product: offset the diagonals (as the FID reference code)
            eps = 1e-6 * max(np.trace(cov1) + np.trace(cov2), 1e-12) / cov1.shape[0]
            offset = np.eye(cov1.shape[0]) * eps
            root = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
        if np.iscomplexobj(root):
            imag = np.max(np.abs(np.diagonal(root).imag))
            scale = max(np.max(np.abs(np.diagonal(root).real)), 1e-12)
            if imag > 1e-3 * scale:
                raise ValueError(f"matrix square root has a large imaginary part ({imag:.3g})")
            root = root.real
        return float(np.trace(root))
    raise ValueError(f"unknown method {method!r}")


def frechet_distance(mu1, cov1, mu2, cov2, method: str = "eigh") -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2); >= 0 up to rounding, which
    is clipped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError("mismatched shapes")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2, method))
    return max(value, 0.0)


def frechet_distance_samples(x: np.ndarray, y: np.ndarray, shrinkage: float | str = "auto",
                             method: str = "eigh") -> dict:
    """Frechet distance between Gaussians fitted to samples x [n, d] and y [m, d]; with the intensities used."""
    mu1, cov1, lam1 = gaussian_stats(x, shrinkage)
    mu2, cov2, lam2 = gaussian_stats(y, shrinkage)
    return {"fd": frechet_distance(mu1, cov1, mu2, cov2, method), "shrinkage_x": lam1, "shrinkage_y": lam2,
            "n_x": len(x), "n_y": len(y), "dim": int(mu1.size)}
