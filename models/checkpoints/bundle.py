"""``CheckpointBundle``: a ``ModelBundle`` over a foreign checkpoint, so that serving, the pipeline, benchmarks and
distillation drive it exactly like an embedded model, with the project's own schedules and samplers."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from torch import nn

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.checkpoints.weights import CheckpointError
from models.codec.base import AudioCodec
from models.diffusion import make_schedule
from models.diffusion.schedules import NoiseSchedule
from models.text import TextEmbedding
from models.text.encoders import null_embedding

SERVING_OVERRIDES = "serving.json"  # optional file beside a checkpoint: BundleConfig fields to override


class CheckpointBundle(ModelBundle):
    """``schedule`` is the schedule object the denoiser adapter converts time with (a DDPM table is not something
    ``make_schedule`` can name). ``null_condition``: the model's unconditional branch is an all-zero cross-attention
    input rather than the empty prompt (Stable Audio), see ``models.checkpoints.denoisers``. ``base_path``: the
    original checkpoint directory a derived model (``format_derived``) was trained from."""

    def __init__(self, config: BundleConfig, denoiser: nn.Module, codec: AudioCodec, text_encoder,
                 schedule: NoiseSchedule, null_condition: bool = False, device: str = "cpu",
                 path: Path | None = None, source_format: str = "", base_path: Path | None = None):
        try:
            make_schedule(config.schedule)
            base = config
        except (ValueError, KeyError, TypeError):
            base = replace(config, schedule={"name": "vp-cosine"})  # placeholder; replaced just below
        super().__init__(base, denoiser, codec, text_encoder, device=device, path=path)
        self.config = config
        self.schedule = schedule
        self.null_condition = null_condition
        self.source_format = source_format
        self.base_path = base_path or path  # the original checkpoint (a derived model's base; else the model itself)

    def unconditional_text(self, n: int) -> TextEmbedding:
        if not self.null_condition:
            return super().unconditional_text(n)
        return null_embedding(n, self.text_encoder.dim, getattr(self.text_encoder, "pooled_dim", self.text_encoder.dim))

    def save(self, path, save_codec: bool = True) -> None:
        raise NotImplementedError(f"{self.name} was loaded from a {self.source_format} checkpoint and is served from "
                                  f"that directory ({self.path}); a trained copy of its denoiser is written with "
                                  "models.checkpoints.format_derived.save")


def bundle_config(path: Path, **values) -> BundleConfig:
    """A BundleConfig named after the directory, with the format's defaults and then the optional serving.json."""
    values.setdefault("name", path.name)
    overrides_file = path / SERVING_OVERRIDES
    if overrides_file.is_file():
        try:
            overrides = json.loads(overrides_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{overrides_file}: not valid JSON ({exc})") from exc
        unknown = BundleConfig.unknown_keys(overrides)
        if unknown:
            raise CheckpointError(f"{overrides_file}: unknown keys {unknown}; expected BundleConfig fields")
        values.update(overrides)
    return BundleConfig(**values)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
