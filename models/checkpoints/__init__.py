"""Checkpoints of public models in their own formats, loaded into the project's model interfaces.

``detect_format(path)`` recognises a directory by its files; ``load_checkpoint_dir(path)`` returns a
``CheckpointBundle`` (a ``ModelBundle``) that the service, benchmarks and distillation drive like an embedded model.

| format | recognised by | models |
| --- | --- | --- |
| ``stable-audio-3`` | ``model_index.json`` for ``StableAudio3Pipeline``; a T5Gemma ``model_config.json`` | Stable Audio 3 |
| ``stable-audio-tools`` | ``model_config.json`` (+ ``model.safetensors`` / ``model.ckpt``) | Stable Audio Open Small, 1.0 |
| ``diffusers-stable-audio`` | ``model_index.json`` naming ``StableAudioPipeline`` | Stable Audio Open 1.0 |
| ``tango`` | ``model_index.json`` with ``unet``, ``vae`` and ``vocoder`` components | Tango (AudioLDM-style) |
| ``derived`` | ``derived.json`` + ``denoiser.safetensors`` | students / ARC models trained here from one of the above |

The networks are this package's own implementations of the published architectures (no reference package is
needed to serve); tests/test_checkpoints.py proves them equal to the reference implementations.
"""
from __future__ import annotations

from pathlib import Path

from models.checkpoints import format_derived
from models.checkpoints.bundle import CheckpointBundle
from models.checkpoints.weights import CheckpointError

FORMATS = {**format_derived.BASE_FORMATS, format_derived.NAME: format_derived}


def detect_format(path: str | Path) -> str | None:
    """The name of the checkpoint format of a directory, or None if it is none of them."""
    path = Path(path)
    if not path.is_dir():
        return None
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    return None


def is_checkpoint_dir(path: str | Path) -> bool:
    return detect_format(path) is not None


def load_checkpoint_dir(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    """Load a checkpoint directory of any supported format; a clear ``CheckpointError`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    name = detect_format(path)
    if name is None:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path}: not a checkpoint directory of any supported format ({', '.join(FORMATS)}): expected "
            f"model_config.json (stable-audio-tools, or Stable Audio 3's own layout with a T5Gemma conditioner), a "
            f"diffusers model_index.json for StableAudioPipeline or StableAudio3Pipeline or with unet/vae/vocoder "
            f"components, or derived.json (a model trained here from one of those); found {present}")
    return FORMATS[name].load(path, device=device, text_encoder=text_encoder)


__all__ = [
    "FORMATS",
    "CheckpointBundle",
    "CheckpointError",
    "detect_format",
    "is_checkpoint_dir",
    "load_checkpoint_dir",
]
