"""Models trained from another model (distilled students, ARC generators): load the source with its latent cache,
and export a bundle that shares the source's codec directory."""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

from models.bundle import ZOO, BundleConfig, ModelBundle
from models.dit import DiT
from models.text import load_text_encoder
from models.training.latent_cache import LatentCache, build_latent_cache


def resolve_model(name_or_path: str | Path) -> Path:
    """A model directory, or the name of one under models/zoo."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    if (ZOO / str(name_or_path) / "config.json").is_file():
        return ZOO / str(name_or_path)
    raise FileNotFoundError(f"{name_or_path}: neither a model directory nor a model in {ZOO}")


def load_source(name_or_path: str | Path, device: str = "cpu", text_encoder=None) -> ModelBundle:
    path = resolve_model(name_or_path)
    if text_encoder is None:
        config = BundleConfig.load(path / "config.json")
        text_encoder = load_text_encoder(config.text_encoder, cache_size=2048)
    return ModelBundle.load(path, device=device, text_encoder=text_encoder)


def source_cache(source: ModelBundle, cache_dir: str | Path, clips: int, seed: int) -> LatentCache:
    """The training clips encoded with the source's codec (built once, resumable; an existing cache of the same
    codec, e.g. the teacher's run's, can be passed instead)."""
    return LatentCache.load(build_latent_cache(source.codec, cache_dir, clips, seed=seed))


def codec_dir(bundle: ModelBundle) -> Path:
    """The directory that holds the codec weights a loaded bundle uses."""
    if bundle.path is None:
        raise ValueError("the source model must be loaded from a directory (ModelBundle.load)")
    return (bundle.path / bundle.config.codec_from).resolve() if bundle.config.codec_from else bundle.path.resolve()


def export_derived(source: ModelBundle, denoiser: DiT, out_dir: str | Path, **overrides) -> Path:
    """Save ``denoiser`` as a model directory ``out_dir`` that takes the source's configuration with ``overrides``
    and points at the source's codec (students and ARC models share their teacher's autoencoder)."""
    out = Path(out_dir)
    config = dataclasses.replace(
        source.config, name=out.name, codec={}, codec_from=os.path.relpath(codec_dir(source), out.resolve()),
        **overrides)
    # the bundle moves its modules to its device: hand it copies so the trained ones stay where they are
    denoiser, codec = copy.deepcopy(denoiser), copy.deepcopy(source.codec)
    ModelBundle(config, denoiser, codec, source.text_encoder, device="cpu").save(out, save_codec=False)
    return out
