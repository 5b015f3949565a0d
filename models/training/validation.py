"""Validation while training: a fixed set of the corpus' validation split, generated at every checkpoint by the model
being trained and scored like the quality benchmark (Frechet distance of MFCC statistics to the real clips; pitch,
placement and tempo adherence), so that a run can keep its best checkpoint by a measured figure and not only its
last. Adversarial training needs it most: its losses do not say when the samples start to drift (tta-arc's FD-MFCC
got worse from about 3000 updates on while the losses looked balanced).

The validation split is drawn apart from the training clips and shares no template or value with the held-out
evaluation set, so choosing a checkpoint here does not bias the benchmark's figures."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.bundle import ModelBundle
from models.data.corpus import SAMPLE_RATE, SyntheticCorpus
from models.eval.adherence import evaluate_clip, summarize
from models.eval.embeddings import frechet_distance_samples, mfcc_embedding
from models.eval.pitch import CappedPitch, PitchTracker

# figure name -> True when lower is better; what ``select`` may name
FIGURES = {"fd_mfcc": True, "pitch_error_median": True, "placement_accuracy": False, "tempo_within_5pct": False,
           "worst_ratio": True}
AXES = [k for k in FIGURES if k != "worst_ratio"]


def worst_ratio(figures: dict, reference: dict) -> float | None:
    """Every axis at once, against a reference model's figures on the same set: the worst of the ratios that say how
    much worse the candidate is on each axis (FD-MFCC and pitch error: candidate / reference; placement and tempo:
    reference / candidate). 1 = as good as the reference on every axis, 1.15 = 15 % worse on the worst one; a
    checkpoint that trades one axis for another scores by the one it lost."""
    ratios = []
    for key in AXES:
        value, ref = figures.get(key), reference.get(key)
        if value is None or ref is None:
            continue
        num, den = (value, ref) if FIGURES[key] else (ref, value)
        ratios.append(num / den if den > 0 else (1.0 if num <= 0 else float("inf")))
    return max(ratios) if ratios else None


@dataclass
class ValidationResult:
    step: int
    figures: dict

    def value(self, key: str) -> float | None:
        v = self.figures.get(key)
        return None if v is None else float(v)


class Validator:
    """``clips`` clips of the validation split, cut to at most ``duration`` seconds; their real MFCC statistics are
    computed once. ``evaluate`` generates every caption with fixed seeds and scores the audio."""

    def __init__(self, clips: int, duration: float = 3.0, seed: int = 4321, batch: int = 8, pitch_frames: int = 48):
        if clips < 2:
            raise ValueError("validation needs at least 2 clips (a Frechet distance fits a covariance)")
        corpus = SyntheticCorpus("val", seed=seed)
        self.clips = [corpus[i] for i in range(clips)]
        self.durations = [min(duration, c.duration) for c in self.clips]
        self.batch = batch
        self.pitch_frames = pitch_frames
        self.real_mfcc = np.stack([mfcc_embedding(c.audio[:, : round(d * SAMPLE_RATE)], SAMPLE_RATE)
                                   for c, d in zip(self.clips, self.durations)])
        self._tracker = None

    @torch.no_grad()
    def evaluate(self, bundle: ModelBundle, step: int, steps: int | None = None, guidance: float | None = None,
                 reference: dict | None = None) -> ValidationResult:
        """The figures of ``bundle`` (at ``steps`` / ``guidance``, else its defaults); with ``reference`` (another
        model's figures on this set) also ``worst_ratio`` against it."""
        waves = []
        for b in range(0, len(self.clips), self.batch):
            part = self.clips[b: b + self.batch]
            waves += bundle.pipeline.generate([c.caption for c in part], self.durations[b: b + self.batch],
                                     list(range(b, b + len(part))), steps=steps, guidance=guidance)
        audio = [w.float().numpy() for w in waves]
        fake_mfcc = np.stack([mfcc_embedding(a, SAMPLE_RATE) for a in audio])
        figures = {"fd_mfcc": frechet_distance_samples(fake_mfcc, self.real_mfcc)["fd"]}
        adherence = [self._adherence(a, c.params) for a, c in zip(audio, self.clips)]
        figures.update({k: v for k, v in summarize(adherence).items() if k in AXES})
        if reference is not None:
            figures["worst_ratio"] = worst_ratio(figures, reference)
        return ValidationResult(step, figures)

    def _adherence(self, audio: np.ndarray, params: dict) -> dict:
        tracker = None
        if params.get("category") == "tone":
            if self._tracker is None:  # CREPE's weights load on the first tone
                self._tracker = CappedPitch(PitchTracker(), self.pitch_frames)
            tracker = self._tracker
        return evaluate_clip(audio, SAMPLE_RATE, params, tracker)


class BestCheckpoint:
    """Keeps the checkpoint with the best ``key`` figure: ``export(dest)`` writes it to ``run_dir/best``, and
    ``run_dir/best.json`` records its step and figures (read back on resume); every result goes to
    ``run_dir/validation.jsonl``."""

    def __init__(self, run_dir: str | Path, key: str = "fd_mfcc"):
        if key not in FIGURES:
            raise ValueError(f"unknown validation figure {key!r}; one of {', '.join(FIGURES)}")
        self.dir = Path(run_dir)
        self.key = key
        self.lower_is_better = FIGURES[key]
        self.record = self.dir / "best.json"
        self.best: dict | None = json.loads(self.record.read_text()) if self.record.exists() else None

    @property
    def best_dir(self) -> Path:
        return self.dir / "best"

    def better(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        if self.best is None or self.best.get("key") != self.key:
            return True
        old = self.best["value"]
        return value < old if self.lower_is_better else value > old

    def offer(self, result: ValidationResult, export: Callable[[Path], object]) -> bool:
        """Log ``result``; when it is the best so far, export it. Returns whether it was."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": result.step, **result.figures}) + "\n")
        value = result.value(self.key)
        if not self.better(value):
            return False
        export(self.best_dir)
        self.best = {"key": self.key, "value": value, "step": result.step, "figures": result.figures}
        self.record.write_text(json.dumps(self.best, indent=2))
        return True
