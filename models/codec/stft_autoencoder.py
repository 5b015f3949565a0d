"""The embedded autoencoder: a variational autoencoder in the STFT domain with a phase-accumulating iSTFT decoder.

Encoder: fixed STFT analysis (n_fft 2048, hop 512) of each channel -> log magnitude and the cosine / sine of each
bin's phase advance -> pointwise projection -> ConvNeXt blocks -> stride-4 downsampling -> latent mean and log
variance (32 channels at 44100 / 2048 = 21.5 frames per second, like Stable Audio's Oobleck VAE).

Decoder (the part that runs at serving time, so it is built to be cheap on a CPU): ConvNeXt blocks at the latent
rate -> 4x transposed-conv upsampling to STFT frames -> ConvNeXt blocks -> per channel and bin: log magnitude,
instantaneous-frequency deviation (in bins, unbounded: only the per-hop phase advance matters) and a noisiness in [0, 1]. Phases are accumulated from the predicted
instantaneous frequency (phase-vocoder resynthesis, so a tone keeps its exact pitch), and noisy bins get a
random phase from a fixed seeded table (so noise sounds like noise and decoding stays deterministic and independent
of batch companions). An inverse STFT gives the waveform. About 0.05 s for 10 s of stereo on two CPU cores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.audio.spectral import istft, pad_to_multiple, stft
from models.codec.base import AudioCodec
from models.layers import ConvNeXtBlock1d

LOG_EPS = 1e-5
LOGMAG_GAIN = 4.0
MAG_FLOOR = 1e-3  # the decoder's log magnitude is trained towards log(|X| + MAG_FLOOR): about -114 dB re full scale


@dataclass
class STFTAutoencoderConfig:
    sample_rate: int = 44100
    audio_channels: int = 2
    latent_dim: int = 32
    n_fft: int = 2048
    hop: int = 512
    frames_per_latent: int = 4
    hidden: int = 256
    encoder_blocks: int = 3
    decoder_latent_blocks: int = 3
    decoder_frame_blocks: int = 3
    # ConvNeXt's usual 1e-6..1e-2 layer scale keeps the blocks near identity for thousands of steps, and a decoder
    # that is effectively linear cannot place sharp spectral peaks from a compact code (measured on an 8-clip
    # overfit, 120 steps: log-magnitude L1 0.30 with 1.0 against 0.68 with 1e-2)
    layer_scale: float = 1.0
    phase_seed: int = 20261121
    # latent normalisation measured on the corpus after training: z = (mu - shift) / scale
    latent_shift: list[float] = field(default_factory=list)
    latent_scale: list[float] = field(default_factory=list)

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_latent(self) -> int:
        return self.hop * self.frames_per_latent


def analysis_features(spec: Tensor, hop: int, n_fft: int) -> Tensor:
    """[B, 2, K, F] complex -> [B, 2 * 3 * K, F]: log magnitude and the cos / sin of the phase advance
    relative to each bin's nominal advance, the latter gated by the bin's magnitude relative to the loudest bin of
    its frame (the phase advance of a silent bin is random and would drown the signal)."""
    k = torch.arange(spec.shape[-2], device=spec.device, dtype=torch.float32)
    nominal = 2 * math.pi * k * hop / n_fft
    phase = torch.angle(spec)
    dphi = torch.diff(phase, dim=-1, prepend=phase[..., :1]) - nominal[:, None]
    mag = spec.abs()
    logmag = torch.log(mag + LOG_EPS)
    gate = mag / mag.amax(dim=-2, keepdim=True).clamp(min=1e-4)
    feats = torch.stack([logmag / 5.0, gate * torch.cos(dphi), gate * torch.sin(dphi)], dim=2)  # [B, 2, 3, K, F]
    return feats.flatten(1, 3)


class STFTAutoencoder(AudioCodec):
    def __init__(self, config: STFTAutoencoderConfig | None = None):
        super().__init__()
        c = self.config = config or STFTAutoencoderConfig()
        self.sample_rate, self.audio_channels, self.latent_dim = c.sample_rate, c.audio_channels, c.latent_dim
        self.samples_per_latent = c.samples_per_latent
        k, h = c.bins, c.hidden

        def blocks(n: int, kernel_size: int = 7) -> nn.Sequential:
            return nn.Sequential(*[ConvNeXtBlock1d(h, kernel_size, layer_scale=c.layer_scale) for _ in range(n)])

        # encoder
        self.enc_in = nn.Conv1d(c.audio_channels * 3 * k, h, 1)
        self.enc_frame = blocks(c.encoder_blocks)
        self.enc_down = nn.Conv1d(h, h, c.frames_per_latent, stride=c.frames_per_latent)
        self.enc_latent = blocks(c.encoder_blocks, kernel_size=5)
        self.enc_out = nn.Conv1d(h, 2 * c.latent_dim, 1)
        # decoder
        self.dec_in = nn.Conv1d(c.latent_dim, h, 3, padding=1)
        self.dec_latent = blocks(c.decoder_latent_blocks, kernel_size=5)
        self.dec_up = nn.ConvTranspose1d(h, h, c.frames_per_latent, stride=c.frames_per_latent)
        self.dec_frame = blocks(c.decoder_frame_blocks)
        self.dec_norm = nn.LayerNorm(h)
        self.dec_out = nn.Linear(h, c.audio_channels * 3 * k)
        with torch.no_grad():
            self.dec_out.bias.view(c.audio_channels, 3, k)[:, 0] = 0.0
        shift = torch.tensor(c.latent_shift or [0.0] * c.latent_dim)
        scale = torch.tensor(c.latent_scale or [1.0] * c.latent_dim)
        self.register_buffer("latent_shift", shift.view(1, -1, 1), persistent=False)
        self.register_buffer("latent_scale", scale.view(1, -1, 1), persistent=False)
        self._phase_table: Tensor | None = None

    # ---------------------------------------------------------------- encoder
    def analyse(self, wave: Tensor) -> Tensor:
        """Complex STFT frames aligned with latents: [B, 2, K, T * frames_per_latent]."""
        c = self.config
        wave = pad_to_multiple(wave, c.samples_per_latent)
        frames = wave.shape[-1] // c.hop
        return stft(wave, c.n_fft, c.hop)[..., :frames]

    def encode_distribution(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised posterior (mean, logvar) of shape [B, latent_dim, T]."""
        c = self.config
        h = self.enc_in(analysis_features(self.analyse(wave), c.hop, c.n_fft))
        h = self.enc_latent(self.enc_down(self.enc_frame(h)))
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-12, 4)

    def normalize(self, mean: Tensor) -> Tensor:
        return (mean - self.latent_shift) / self.latent_scale

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents * self.latent_scale + self.latent_shift

    @torch.no_grad()
    def encode(self, wave: Tensor) -> Tensor:
        return self.normalize(self.encode_distribution(wave)[0])

    # ---------------------------------------------------------------- decoder
    def decode_params(self, raw_latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unnormalised latents -> (log magnitude, IF deviation in bins, noisiness), each [B, 2, K, F]."""
        c = self.config
        h = self.dec_latent(self.dec_in(raw_latents))
        h = self.dec_frame(self.dec_up(h))
        out = self.dec_out(self.dec_norm(h.transpose(1, 2)))  # [B, F, 2*3*K]
        out = out.view(out.shape[0], out.shape[1], c.audio_channels, 3, c.bins).permute(0, 2, 3, 4, 1)
        # a gain on the log-magnitude output: loud bins sit ~12 nats above the floor, and at unit gain an
        # optimiser step moves the output too little to get there in a short training run
        logmag = (math.log(MAG_FLOOR) + LOGMAG_GAIN * out[:, :, 0]).clamp(max=8.0)
        # unbounded on purpose: the phase advance is periodic in the deviation (period n_fft / hop bins), and a
        # bounded output would saturate where the periodic loss has aliased minima
        deviation = out[:, :, 1]
        noisiness = torch.sigmoid(out[:, :, 2])
        return logmag, deviation, noisiness

    def phase_table(self, frames: int, device) -> Tensor:
        """Fixed uniform(-1, 1) table [2, K, frames] from a seed: independent of batch and call order."""
        c = self.config
        if self._phase_table is None or self._phase_table.shape[-1] < frames:
            n = max(frames, 4096)
            g = torch.Generator().manual_seed(c.phase_seed)
            self._phase_table = torch.rand(c.audio_channels, c.bins, n, generator=g) * 2 - 1
        return self._phase_table[..., :frames].to(device)

    def phases(self, deviation: Tensor, noisiness: Tensor) -> Tensor:
        """Accumulate each bin's predicted phase advance over frames (float32 is enough: increments are wrapped
        first, so the running sum stays below frames * 2 pi), then add the noisy part."""
        c = self.config
        k = torch.arange(c.bins, device=deviation.device, dtype=deviation.dtype)
        advance = torch.remainder((k[:, None] + deviation) * (2 * math.pi * c.hop / c.n_fft), 2 * math.pi)
        table = self.phase_table(deviation.shape[-1], deviation.device)
        start = (math.pi * table[..., :1]).expand(deviation.shape[:-1] + (1,))
        phase = torch.cumsum(torch.cat([start, advance[..., 1:]], dim=-1), dim=-1)
        return phase + math.pi * noisiness * table

    def synthesize(self, logmag: Tensor, deviation: Tensor, noisiness: Tensor) -> Tensor:
        c = self.config
        spec = torch.polar(torch.exp(logmag), self.phases(deviation, noisiness))
        spec = F.pad(spec, (0, 1))  # the centred iSTFT wants frames + 1
        return istft(spec, c.n_fft, c.hop, length=spec.shape[-1] * c.hop - c.hop)

    def decode_raw(self, raw_latents: Tensor) -> Tensor:
        return self.synthesize(*self.decode_params(raw_latents))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_raw(self.denormalize(latents)).clamp(-1, 1)

    def to_config(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> "STFTAutoencoder":
        return cls(STFTAutoencoderConfig(**config))
