"""Audio codecs: waveform <-> latent sequence. ``load_codec`` reads a codec directory (config.json + codec.safetensors)."""
from __future__ import annotations

from pathlib import Path

from models.codec.base import AudioCodec
from models.codec.harmonic import HarmonicAutoencoder, HarmonicAutoencoderConfig
from models.files import read_json, read_weights

__all__ = ["AudioCodec", "HarmonicAutoencoder", "HarmonicAutoencoderConfig", "load_codec"]


def load_codec(codec_dir: str | Path, config: dict | None = None) -> HarmonicAutoencoder:
    """The embedded codec from ``codec_dir``; ``config`` overrides the directory's config.json["codec"]."""
    codec_dir = Path(codec_dir)
    if config is None:
        config = read_json(codec_dir / "config.json").get("codec")
        if not isinstance(config, dict):
            raise ValueError(f"{codec_dir / 'config.json'}: no 'codec' block")
    codec = HarmonicAutoencoder.from_config(config)
    codec.load_state_dict(read_weights(codec_dir / "codec.safetensors"))
    return codec.eval()
