"""Models trained from another model (distilled students, ARC generators): load the source with its latent cache,
and export a model that shares the source's codec. The source is a project model directory (a zoo model) or a
checkpoint directory of a format ``models.checkpoints`` reads (Stable Audio, Tango, or a model derived from one);
a project model exports as a bundle directory pointing at its codec, a checkpoint as a ``derived`` directory over
its base checkpoint (``models.checkpoints.format_derived``)."""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

from torch import nn

from models.bundle import ModelBundle
from models.checkpoints import CheckpointBundle, format_derived
from models.training.latent_cache import LatentCache, build_latent_cache


def source_cache(source: ModelBundle, cache_dir: str | Path, clips: int, seed: int) -> LatentCache:
    """The training clips encoded with the source's codec (built once, resumable; an existing cache of the same
    codec, e.g. the teacher's run's, can be passed instead)."""
    return LatentCache.load(build_latent_cache(source.codec, cache_dir, clips, seed=seed))


def window_frames(source: ModelBundle) -> int:
    """The longest window, in latent frames, ``source`` generates (its max_duration): training clips are cut to it."""
    codec = source.codec
    return codec.latent_frames(round(source.config.max_duration * codec.sample_rate))


def codec_dir(bundle: ModelBundle) -> Path:
    """The directory that holds the codec weights a loaded bundle uses."""
    if bundle.path is None:
        raise ValueError("the source model must be loaded from a directory (ModelBundle.load)")
    return (bundle.path / bundle.config.codec_from).resolve() if bundle.config.codec_from else bundle.path.resolve()


def export_derived(source: ModelBundle, denoiser: nn.Module, out_dir: str | Path, **overrides) -> Path:
    """Save ``denoiser`` as a model directory ``out_dir`` that takes the source's configuration with ``overrides``
    and points at the source's codec (students and ARC models share their teacher's autoencoder)."""
    if isinstance(source, CheckpointBundle):
        return format_derived.save(source, denoiser, out_dir, **overrides)
    out = Path(out_dir)
    config = dataclasses.replace(
        source.config, name=out.name, codec={}, codec_from=os.path.relpath(codec_dir(source), out.resolve()),
        **overrides)
    # the bundle moves its modules to its device: hand it copies so the trained ones stay where they are
    denoiser, codec = copy.deepcopy(denoiser), copy.deepcopy(source.codec)
    ModelBundle(config, denoiser, codec, source.text_encoder, device="cpu").save(out, save_codec=False)
    return out
