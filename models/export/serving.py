"""The serving configuration an export is served with, for every runtime that serves exported graphs.

A checkpoint directory's configuration is computed by its format's loader at export time and kept in the manifest
(the runtime loads no torch model to compute it again); a project model directory's is its ``config.json``."""
from __future__ import annotations

from pathlib import Path

from models.config import BundleConfig


def serving_config(model_dir: Path, manifest: dict, source: str = "manifest") -> BundleConfig:
    checkpoint = manifest.get("checkpoint")
    if checkpoint:
        return BundleConfig.from_dict(checkpoint["config"], source)
    return BundleConfig.load(Path(model_dir) / "config.json")


def latent_frames(duration: float, sample_rate: int, samples_per_latent: int) -> int:
    """Latent frames of a clip of ``duration`` seconds: whole frames covering round(duration * rate) samples."""
    return -(-round(duration * sample_rate) // samples_per_latent)
