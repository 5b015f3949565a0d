"""Audio codecs: waveform <-> latent sequence. ``load_codec`` reads a codec directory (config.json + codec.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

from models.codec.base import AudioCodec
from models.codec.harmonic import HarmonicAutoencoder, HarmonicAutoencoderConfig

__all__ = ["AudioCodec", "HarmonicAutoencoder", "HarmonicAutoencoderConfig", "load_codec"]


def load_codec(codec_dir: str | Path, config: dict | None = None) -> HarmonicAutoencoder:
    """The embedded codec from ``codec_dir``; ``config`` overrides the directory's config.json["codec"]."""
    from safetensors.torch import load_file

    codec_dir = Path(codec_dir)
    config = config or json.loads((codec_dir / "config.json").read_text())["codec"]
    codec = HarmonicAutoencoder.from_config(config)
    codec.load_state_dict(load_file(codec_dir / "codec.safetensors"))
    return codec.eval()
