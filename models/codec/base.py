"""The codec interface: 44.1 kHz stereo waveform <-> latent sequence."""
from __future__ import annotations

from torch import Tensor, nn


class AudioCodec(nn.Module):
    """``encode(wave [B, 2, N]) -> latents [B, C, T]`` (normalised to about unit variance, ready for diffusion) and
    ``decode(latents [B, C, T]) -> wave [B, 2, T * samples_per_latent]``.

    A codec whose decoder ends in a step that an ONNX graph cannot hold, or only slowly (an inverse FFT, a polyphase
    resampler), also has ``decode_native`` (the part before it: what the exported decoder graph computes) and
    ``native_tail`` (the manifest's description of the rest, which ``models.export.graphs.finish_native`` applies).
    Likewise a codec whose encoder starts with such a step (an STFT) has ``encode_native`` (the rest of ``encode``:
    what the exported encoder graph computes) and ``native_head`` (the step, which
    ``models.export.graphs.start_native`` applies before the graph)."""

    sample_rate: int
    audio_channels: int
    latent_dim: int
    samples_per_latent: int

    def latent_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.samples_per_latent)

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.samples_per_latent

    @property
    def pitch_channels(self) -> int:
        """How many leading latent channels state tonality and pitch (the harmonic codec's slots; 0: none)."""
        return int(getattr(getattr(self, "config", None), "pitch_channels", 0))

    @property
    def analytic_channels(self) -> int:
        """How many leading latent channels are computed, not learned (the harmonic codec's tonality, pitch and
        stereo balance; 0: none)."""
        return int(getattr(getattr(self, "config", None), "analytic_channels", 0))

    def encode(self, wave: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
