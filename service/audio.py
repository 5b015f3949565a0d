"""Audio in and out of the service: float waveforms -> response bytes (16-bit PCM WAV / FLAC / headerless PCM, Ogg
Vorbis, MP3, Ogg Opus), and uploaded clips -> float waveforms at a model's sample rate. Every format goes through
libsndfile (soundfile); one band-limited resampler (``resample``) serves both directions."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import get_args

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly  # here, not on first use: its first import takes about a second
from torch import Tensor

from models.audio.pcm import pcm16
from service.schemas import FormatName
from service.settings import DEFAULT_MP3_BITRATE_KBPS


@dataclass(frozen=True)
class AudioFormat:
    container: str  # libsndfile's major format
    subtype: str  # libsndfile's encoding inside it
    media_type: str  # the response's Content-Type
    sample_rate: int | None = None  # the rate this format is always written at; None: the model's own

    @property
    def pcm16(self) -> bool:
        return self.subtype == "PCM_16"


FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("WAV", "PCM_16", "audio/wav"),
    "flac": AudioFormat("FLAC", "PCM_16", "audio/flac"),
    "ogg": AudioFormat("OGG", "VORBIS", "audio/ogg"),
    # audio/mpeg is MP3's registered type (RFC 3003), the one every browser and player matches on
    "mp3": AudioFormat("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    # Ogg-encapsulated Opus is registered as audio/ogg (RFC 7845); the codecs parameter (RFC 5334) lets a client tell
    # it from Vorbis before decoding (browsers' canPlayType / MediaSource answer for "audio/ogg; codecs=opus"), and a
    # client that matches on the bare audio/ogg type still accepts it. (audio/opus names Opus in RTP, RFC 7587, not a
    # file.) libsndfile's Opus encoder takes 8, 12, 16, 24 or 48 kHz only: Opus comes out at 48 kHz.
    "opus": AudioFormat("OGG", "OPUS", "audio/ogg; codecs=opus", sample_rate=48000),
    # headerless interleaved 16-bit little-endian samples at the model's rate (44.1 kHz stereo), as OpenAI-style
    # speech APIs name it
    "pcm": AudioFormat("RAW", "PCM_16", "audio/pcm"),
}
assert set(FORMATS) == set(get_args(FormatName)), "FORMATS and the request schema's format names differ"
# the media types a 200 of a generation route may carry (its OpenAPI ``responses`` content)
AUDIO_CONTENT: dict[str, dict] = {f.media_type: {} for f in FORMATS.values()}


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """[frames, channels] float at ``rate`` -> float32 at ``target``: band-limited polyphase resampling (scipy's
    ``resample_poly``, a Kaiser-windowed FIR); ceil(frames * target / rate) frames come out."""
    if rate == target:
        return audio
    ratio = Fraction(target, rate)
    return resample_poly(audio, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)


def mp3_compression_level(kbps: int, sample_rate: int) -> float:
    """The libsndfile compression level that gives LAME ``kbps`` at constant bitrate. libsndfile maps a level c in
    [0, 1] linearly onto LAME's bitrate range for the sample rate, ``int(high - c * (high - low))`` (MPEG-1 at
    >= 32 kHz: 320 .. 32 kbps; MPEG-2 at >= 16 kHz: 160 .. 8; MPEG-2.5 below: 64 .. 8), and LAME takes the nearest
    standard rate; this inverts that map, half a kbps above the target so the truncation lands on it."""
    low, high = (32, 320) if sample_rate >= 32000 else (8, 160) if sample_rate >= 16000 else (8, 64)
    kbps = min(max(kbps, low), high)
    return min(1.0, max(0.0, (high - kbps - 0.5) / (high - low)))


def to_pcm16(wave: Tensor) -> np.ndarray:
    """[channels, frames] float in [-1, 1] -> [frames, channels] int16 (round to nearest, clipped)."""
    return np.ascontiguousarray(pcm16(wave.detach().cpu()).numpy().T)


def encode_audio(wave: Tensor, sample_rate: int, fmt: str,
                 mp3_bitrate_kbps: int = DEFAULT_MP3_BITRATE_KBPS) -> tuple[bytes, str]:
    """``wave`` ([channels, frames] float at ``sample_rate``) as a file of format ``fmt`` (a key of ``FORMATS``) and
    its media type. MP3 is constant-bitrate at ``mp3_bitrate_kbps``. Lossy codecs get float samples: libsndfile's
    16-bit stereo path into LAME copies half of each buffer (it scrambles the audio), its float path is whole."""
    spec = FORMATS[fmt]
    if spec.pcm16:
        data, rate = to_pcm16(wave), sample_rate
    else:
        rate = spec.sample_rate or sample_rate
        data = resample(wave.detach().cpu().numpy().T.astype(np.float32), sample_rate, rate)
    options = {}
    if spec.container == "MP3":
        options = {"compression_level": mp3_compression_level(mp3_bitrate_kbps, rate), "bitrate_mode": "CONSTANT"}
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=spec.container, subtype=spec.subtype, **options)
    return buf.getvalue(), spec.media_type


class AudioInputError(ValueError):
    """An uploaded clip that cannot be used; the message says why (the HTTP layer answers 422)."""


def decode_audio(data: bytes, sample_rate: int, max_seconds: float) -> Tensor:
    """An uploaded clip (WAV, FLAC, Ogg, MP3: whatever libsndfile reads) as a float waveform [2, N] at
    ``sample_rate``: at most its first ``max_seconds`` are read; mono is duplicated to both channels, more than two
    channels keep the first two (front left and right); other sample rates are converted by ``resample``."""
    import torch

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = f.samplerate, f.channels
            audio = f.read(frames=min(f.frames, math.ceil(max_seconds * rate)) if f.frames > 0 else -1,
                           dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        why = getattr(exc, "error_string", None) or exc  # libsndfile's words, without the reader object's repr
        raise AudioInputError(f"init_audio: not a readable WAV, FLAC, Ogg or MP3 file ({why})") from None
    if audio.shape[0] == 0:
        raise AudioInputError("init_audio: the clip holds no samples")
    if not np.isfinite(audio).all():
        raise AudioInputError("init_audio: the clip holds NaN or infinite samples")
    audio = audio[:, :2] if channels >= 2 else np.repeat(audio, 2, axis=1)
    return torch.from_numpy(np.ascontiguousarray(resample(audio, rate, sample_rate).T))
