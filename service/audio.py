"""Float waveforms -> response bytes (PCM 16-bit WAV / FLAC, Ogg Vorbis)."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from torch import Tensor

FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "ogg": ("OGG", "VORBIS", "audio/ogg"),
}


def to_pcm16(wave: Tensor) -> np.ndarray:
    """[channels, frames] float in [-1, 1] -> [frames, channels] int16 (round to nearest, clipped)."""
    x = np.clip(wave.detach().cpu().numpy().T, -1.0, 1.0)
    return np.round(x * 32767.0).astype(np.int16)


def encode_audio(wave: Tensor, sample_rate: int, fmt: str) -> tuple[bytes, str]:
    container, subtype, media_type = FORMATS[fmt]
    buf = io.BytesIO()
    data = to_pcm16(wave) if subtype == "PCM_16" else wave.detach().cpu().numpy().T.astype(np.float32)
    sf.write(buf, data, sample_rate, format=container, subtype=subtype)
    return buf.getvalue(), media_type
