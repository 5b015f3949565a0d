"""Audio in and out of the service: float waveforms -> response bytes (PCM 16-bit WAV / FLAC, Ogg Vorbis), and
uploaded clips -> float waveforms at a model's sample rate."""
from __future__ import annotations

import io
import math

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


class AudioInputError(ValueError):
    """An uploaded clip that cannot be used; the message says why (the HTTP layer answers 422)."""


def decode_audio(data: bytes, sample_rate: int, max_seconds: float) -> Tensor:
    """An uploaded clip (WAV, FLAC, Ogg: whatever libsndfile reads) as a float waveform [2, N] at ``sample_rate``:
    at most its first ``max_seconds`` are read; mono is duplicated to both channels, more than two channels keep
    the first two (front left and right); other sample rates are converted with a band-limited polyphase
    resampler (a Kaiser-windowed FIR, scipy's ``resample_poly``)."""
    import torch
    from scipy.signal import resample_poly

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = f.samplerate, f.channels
            audio = f.read(frames=min(f.frames, math.ceil(max_seconds * rate)) if f.frames > 0 else -1,
                           dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioInputError(f"init_audio: not a readable WAV, FLAC or Ogg file ({exc})") from None
    if audio.shape[0] == 0:
        raise AudioInputError("init_audio: the clip holds no samples")
    if not np.isfinite(audio).all():
        raise AudioInputError("init_audio: the clip holds NaN or infinite samples")
    audio = audio[:, :2] if channels >= 2 else np.repeat(audio, 2, axis=1)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        audio = resample_poly(audio, sample_rate // g, rate // g, axis=0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(audio.T))
