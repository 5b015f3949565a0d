"""``BundleConfig``: what a model directory's ``config.json`` says about how to sample the model.

The networks' own shapes live in the ``denoiser`` / ``codec`` / ``text_encoder`` blocks; the fields here are the
diffusion maths (schedule, parameterisation, sampler), the request defaults and limits, and where the codec lives.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from models.files import read_json

log = logging.getLogger("tta.models")

# Keys older configs may hold that no longer mean anything: dropped on load with a warning, as diffusers does with a
# config key its class no longer takes (the pitch-channel sampling options were measured and not shipped).
RETIRED_KEYS = frozenset({"pitch_channels", "pitch_noise", "pitch_guidance"})


def drop_retired_keys(config: dict, retired: Iterable[str], owner: str) -> dict:
    """``config`` without the ``retired`` keys (options that no longer exist), each one it held named in a logged
    warning, so that a config written before their removal still loads (as diffusers drops unexpected config keys).
    ``owner`` names the config in the warning."""
    dropped = sorted(k for k in retired if k in config)
    if dropped:
        log.warning("%s: ignoring retired config keys %s (options that no longer exist)", owner, ", ".join(dropped))
    return {k: v for k, v in config.items() if k not in dropped}


class ConfigError(ValueError):
    """A config file that cannot describe a model; the message names the file and the key."""


@dataclass
class BundleConfig:
    name: str
    kind: str = "teacher"  # teacher | bsa | arc | ...
    schedule: dict = field(default_factory=lambda: {"name": "vp-cosine"})
    parameterization: str = "v"
    sampler: str = "ddim"
    sampler_options: dict = field(default_factory=dict)  # the sampler's keyword arguments (a ping-pong grid's range)
    default_steps: int = 200
    max_steps: int = 500
    default_guidance: float = 3.0
    guidance_in_model: bool = False  # student learned the guided output: one forward per step, guidance as input
    # the denoiser has a trained inpainting input (``local_cond``: keep mask + known latents, Stable Audio 3); without
    # one the pipeline inpaints by replacing the known region's x0 prediction with the known latents at every step
    inpaint_conditioning: bool = False
    # audio-to-audio at init_noise_level < 1: "enter" joins the model's own grid at its first time at or below the
    # level (fewer steps, the times the model was trained to sample at); "compress" runs the full step count on a grid
    # squeezed into [level, 0] (Stable Audio 3's reference sampling)
    audio_to_audio_grid: str = "enter"
    default_duration: float = 5.0
    max_duration: float = 10.0
    text_encoder: dict = field(default_factory=lambda: {"name": "minilm"})
    denoiser: dict = field(default_factory=dict)
    codec: dict = field(default_factory=dict)
    codec_from: str | None = None  # directory (relative to this one) whose codec this model shares
    description: str = ""
    training: dict = field(default_factory=dict)

    @classmethod
    def unknown_keys(cls, keys) -> list[str]:
        """The names among ``keys`` that are not fields of this config, sorted."""
        return sorted(set(keys) - set(cls.__dataclass_fields__))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> BundleConfig:
        """A config from parsed JSON. Retired keys are dropped with a warning; any other unknown key, a missing
        ``name`` or a value of the wrong kind is a ``ConfigError`` naming ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = drop_retired_keys(data, RETIRED_KEYS, source)
        unknown = cls.unknown_keys(data)
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}")
        if "name" not in data:
            raise ConfigError(f"{source}: the required key 'name' is missing")
        config = cls(**data)
        if config.audio_to_audio_grid not in ("enter", "compress"):
            raise ConfigError(f"{source}: audio_to_audio_grid must be 'enter' or 'compress', got "
                              f"{config.audio_to_audio_grid!r}")
        return config

    @classmethod
    def load(cls, path: str | Path) -> BundleConfig:
        path = Path(path)
        try:
            data = read_json(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data, str(path))
