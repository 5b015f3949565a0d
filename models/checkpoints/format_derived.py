"""Models trained here from a checkpoint (BSA students, ARC generators of Stable Audio or Tango): a directory with
``derived.json`` and the trained denoiser's weights, served on top of the checkpoint it was trained from.

    derived.json          {"base": "../stable-audio-open-small", "weights": "denoiser.safetensors",
                           "config": {"kind": "arc", "sampler": "pingpong", "default_steps": 4, ...}}
    denoiser.safetensors  the denoiser adapter's state dict (DiT or UNet and, for Stable Audio, its number
                          conditioners and text projection), in this project's parameter names

Only the denoiser changes when a model is distilled or post-trained; the codec, the text encoder and the noise
schedule are the base checkpoint's, so the directory stays small (the denoiser only) and the base is read in its own
format. ``base`` (relative to this directory, or absolute) names the ORIGINAL checkpoint: a student of a student
points at the same base, never at another derived directory. ``config`` holds the BundleConfig fields that differ
from the base's (sampler, step count, guidance, description, training record); ``serving.json`` beside it may
override them again, like for any checkpoint. The schedule cannot be overridden: the denoiser was trained on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from models.checkpoints import (
    format_diffusers_stable_audio,
    format_stable_audio_3,
    format_stable_audio_tools,
    format_tango,
)
from models.checkpoints.bundle import CheckpointBundle, bundle_config, read_json
from models.checkpoints.weights import CheckpointError, check_fit, expected_shapes, read_state_dict, tensor_shapes
from models.config import BundleConfig

NAME = "derived"
MANIFEST = "derived.json"
WEIGHTS = "denoiser.safetensors"
FIXED = ("schedule", "parameterization", "text_encoder", "denoiser", "codec", "codec_from")
# the formats a derived model's base can have (a derived model of a derived model points at the original base), in
# the order they are tried: Stable Audio 3's own layout is a model_config.json too, so it is asked before
# stable-audio-tools
BASE_FORMATS = {m.NAME: m for m in (format_stable_audio_3, format_stable_audio_tools, format_diffusers_stable_audio,
                                    format_tango)}


def detect(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def base_format(path: Path) -> str | None:
    """The name of a base checkpoint directory's format, or None."""
    return next((name for name, module in BASE_FORMATS.items() if module.detect(path)), None)


def base_dir(path: Path, manifest: dict) -> Path:
    base = manifest.get("base")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{path / MANIFEST}: no 'base' checkpoint directory")
    return (path / base).resolve()


def load(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    base = base_dir(path, manifest)
    if detect(base):
        raise CheckpointError(f"{path / MANIFEST}: base {base} is itself a derived model; point at its base")
    if not base.is_dir():
        raise CheckpointError(f"{path / MANIFEST}: base checkpoint {base} not found")
    kind = base_format(base)
    if kind is None:
        raise CheckpointError(f"{path / MANIFEST}: base {base} is not a checkpoint of any of {sorted(BASE_FORMATS)}")
    source = BASE_FORMATS[kind].load(base, device="cpu", text_encoder=text_encoder)
    weights = path / manifest.get("weights", WEIGHTS)
    state = read_state_dict(weights)
    check_fit(expected_shapes(source.denoiser), tensor_shapes(state), str(weights), "denoiser")
    source.denoiser.load_state_dict(state, strict=True)
    overrides = dict(manifest.get("config", {}))
    unknown = BundleConfig.unknown_keys(overrides)
    if unknown:
        raise CheckpointError(f"{path / MANIFEST}: unknown config keys {unknown}; expected BundleConfig fields")
    inherited = {k: v for k, v in dataclasses.asdict(source.config).items() if k != "name"}
    config = bundle_config(path, **{**inherited, **overrides})  # then serving.json, as for any checkpoint
    fixed = [k for k in FIXED if getattr(config, k) != getattr(source.config, k)]
    if fixed:
        raise CheckpointError(f"{path}: {fixed} come from the base checkpoint {base.name} and cannot be changed")
    return CheckpointBundle(config, source.denoiser, source.codec, source.text_encoder, source.schedule,
                            null_condition=source.null_condition, device=device, path=path,
                            source_format=f"{NAME} ({source.source_format}, base {base.name})", base_path=base)


def save(source: CheckpointBundle, denoiser: nn.Module, out_dir: str | Path, **overrides) -> Path:
    """Write ``denoiser`` (a trained copy of ``source.denoiser``) as a derived model of ``source``'s base checkpoint,
    with the BundleConfig ``overrides`` (the name is the directory's unless given)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected = expected_shapes(source.denoiser)
    state = {k: v.detach().float().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    check_fit(expected, tensor_shapes(state), f"{type(denoiser).__name__}", "denoiser")
    unknown = BundleConfig.unknown_keys(overrides)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    if set(overrides) & set(FIXED):
        raise ValueError(f"{sorted(set(overrides) & set(FIXED))} come from the base checkpoint")
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes owner-only files; a model directory is read by the serving user
    os.replace(tmp, out / WEIGHTS)
    base = source.base_path.resolve()
    manifest = {"base": os.path.relpath(base, out.resolve()), "base_format": base_format(base), "weights": WEIGHTS,
                "config": overrides}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
