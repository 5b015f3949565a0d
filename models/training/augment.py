"""Latent-space data augmentation for denoiser training: edits of the harmonic codec's analytic channels, with the
clip re-captioned from its edited ground truth.

Transposition: a tone clip's cached latents are moved to another pitch with the codec's ``shift_pitch``, so every
draw of a tone can state a pitch the corpus never rendered. A cache of a few thousand clips holds only a few hundred
tones (762 tones at 316 distinct pitches in the embedded teacher's 2500 clips), and a teacher trained without
transposition missed held-out pitches in the values between them, not in the phrasing.

Re-panning: a clip panned hard left or right is given another stated placement (left, right, centre, or a move
either way) by rewriting the stereo-balance channel, so every source is seen in every placement."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from models.data.corpus import PITCH_RANGE_HZ


class PitchTransposer:
    """Transposes a share ``prob`` of the pure-tone clips in a batch to a pitch drawn log-uniformly within
    ``max_octaves`` of the original, rounded to whole Hz, in ``pitch_range`` (the corpus' training range by default)
    and never near a held-out pitch (``corpus.transposed_params``).

    A range wider than the one captions are scored on flattens the training prior over the scored range: guidance
    divides by the unconditional density, so where that density falls off (near the ends of a range every tone
    lies in) it pushes a pitch outward: under guidance 2 the embedded teacher puts "a sine tone at 1614 Hz"
    at 1969 Hz, and a candidate trained on from it over 50-3200 Hz put it at 1815 Hz."""

    def __init__(self, codec, corpus, prob: float, max_octaves: float = 1.0,
                 pitch_range: tuple[float, float] | None = None):
        if not 0.0 <= prob <= 1.0:
            raise ValueError("prob must be in [0, 1]")
        if not hasattr(codec, "shift_pitch"):
            raise ValueError("pitch transposition needs a codec with analytic pitch channels (the harmonic codec)")
        if max_octaves <= 0:
            raise ValueError("max_octaves must be > 0")
        self.codec, self.corpus, self.prob, self.max_octaves = codec, corpus, float(prob), float(max_octaves)
        self.pitch_range = tuple(pitch_range) if pitch_range is not None else PITCH_RANGE_HZ
        if not 0 < self.pitch_range[0] < self.pitch_range[1]:
            raise ValueError(f"pitch_range must be (low, high) in Hz with 0 < low < high, not {pitch_range}")

    def __call__(self, x0: Tensor, mask: Tensor, params: list[dict], rng: np.random.Generator
                 ) -> tuple[Tensor, list[dict]]:
        """Latents [B, C, T] (zero past each clip's end, ``mask`` [B, T]) and their ground truth -> the batch with
        some tones transposed (their params updated to match); the others are returned untouched."""
        ratios, out = [], []
        for p in params:
            ratio = 1.0
            if p.get("category") == "tone" and self.prob > 0 and rng.random() < self.prob:
                lo, hi = p["pitch_hz"] * 2.0 ** -self.max_octaves, p["pitch_hz"] * 2.0 ** self.max_octaves
                q = self.corpus.transposed_params(p, rng, lo, hi, pitch_range=self.pitch_range)
                if q is not None:
                    ratio, p = q["pitch_hz"] / p["pitch_hz"], q
            ratios.append(ratio)
            out.append(p)
        if all(r == 1.0 for r in ratios):
            return x0, out
        with torch.no_grad():
            shifted = self.codec.shift_pitch(x0, torch.tensor(ratios, dtype=x0.dtype))
        moved = torch.tensor([r != 1.0 for r in ratios])
        x0 = torch.where(moved[:, None, None] & mask[:, None, :], shifted, x0)
        return x0, out


def balance_of_pan(pan_db: Tensor) -> Tensor:
    """The corpus' pan (dB of left over right energy) -> the codec's balance channel (half the natural log of right
    over left energy)."""
    return -pan_db * (math.log(10.0) / 20.0)


def pan_track(params: dict, frames: int) -> Tensor:
    """[frames] pan in dB at each latent frame's centre of a clip with these params (a move is linear in dB over
    the clip, as the corpus renders it)."""
    if "pan_start_db" in params:
        x = (torch.arange(frames) + 0.5) / frames
        return params["pan_start_db"] + (params["pan_end_db"] - params["pan_start_db"]) * x
    return torch.full((frames,), float(params.get("pan_db", 0.0)))


class PlacementMover:
    """Re-pans a share ``prob`` of the clips placed left or right (``|pan| >= min_pan_db``) to a freshly drawn
    placement (``corpus.replaced_params``). The encoder's balance of a frame is the pan for a sounding frame and near
    0 for a silent one; the old balance over the old pan (clipped to [0, 1.2]) says which a frame is, and scales the
    new pan, so gaps between clicks stay centred as the encoder would leave them."""

    def __init__(self, codec, corpus, prob: float, min_pan_db: float = 6.0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError("prob must be in [0, 1]")
        config = getattr(codec, "config", None)
        if not getattr(config, "balance", False):
            raise ValueError("re-panning needs a codec with an analytic stereo-balance channel (the harmonic codec)")
        self.codec, self.corpus, self.prob, self.min_pan_db = codec, corpus, float(prob), float(min_pan_db)
        self.channel = config.pitch_channels

    def __call__(self, x0: Tensor, mask: Tensor, params: list[dict], rng: np.random.Generator
                 ) -> tuple[Tensor, list[dict]]:
        out, rows = [], []
        for b, p in enumerate(params):
            if (p.get("placement") in ("left", "right") and abs(p.get("pan_db", 0.0)) >= self.min_pan_db
                    and self.prob > 0 and rng.random() < self.prob):
                p = self.corpus.replaced_params(p, rng)
                rows.append(b)
            out.append(p)
        if not rows:
            return x0, out
        with torch.no_grad():
            raw = self.codec.denormalize(x0[rows])
            for j, b in enumerate(rows):
                frames = int(mask[b].sum())
                old = raw[j, self.channel, :frames]
                loud = (old / balance_of_pan(torch.tensor(params[b]["pan_db"]))).clamp(0.0, 1.2)
                raw[j, self.channel, :frames] = (loud * balance_of_pan(pan_track(out[b], frames))).to(raw.dtype)
            moved = self.codec.normalize(raw)
        x0 = x0.clone()
        x0[rows] = torch.where(mask[rows][:, None, :], moved, x0[rows])
        return x0, out


def compose(*augments: Callable | None) -> Callable | None:
    """One augmentation applying each given one in turn (None: no augmentation at all)."""
    chain = [a for a in augments if a is not None]
    if not chain:
        return None

    def apply(x0: Tensor, mask: Tensor, params: list[dict], rng: np.random.Generator) -> tuple[Tensor, list[dict]]:
        for a in chain:
            x0, params = a(x0, mask, params, rng)
        return x0, params

    return apply


def latent_augment(codec, corpus, pitch_shift: float = 0.0, placement_shift: float = 0.0, shift_octaves: float = 1.0,
                   shift_range: tuple[float, float] | None = None) -> Callable | None:
    """What a trainer's ``pitch_shift`` / ``placement_shift`` settings ask for: transposition of that share of the
    tones (within ``shift_octaves`` of their pitch, to one in ``shift_range``, the corpus' range by default), then
    re-panning of that share of the hard-panned clips; None when both shares are 0."""
    return compose(PitchTransposer(codec, corpus, pitch_shift, shift_octaves, shift_range) if pitch_shift > 0 else None,
                   PlacementMover(codec, corpus, placement_shift) if placement_shift > 0 else None)
