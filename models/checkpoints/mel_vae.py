"""The mel-spectrogram latent codec of Tango / AudioLDM-style models as an ``AudioCodec`` at 44.1 kHz stereo.

decode: latents [B, C*F, T] (C VAE channels x F mel-latent bins, flattened channel-major) -> VAE decoder (diffusers
``AutoencoderKL`` structure and names) -> log-mel [B, 1, 4T, n_mels] -> HiFi-GAN vocoder (transformers'
``SpeechT5HifiGan`` structure and names) -> 16 kHz mono -> band-limited polyphase resampling to 44.1 kHz
(scipy.signal.resample_poly, Kaiser-windowed FIR) -> duplicated to two channels.

encode: the inverse analysis path of the training data: 44.1 kHz -> mono -> 16 kHz -> peak-normalised to 0.5 (as
Tango's data loader does) -> log-mel (reflect-padded STFT magnitude, Slaney mel filters, log(max(x, 1e-5)), as
AudioLDM's TacotronSTFT) -> VAE encoder posterior mean x scaling factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.unet import Downsample2D, ResnetBlock2D, Upsample2D
from models.checkpoints.weights import CheckpointError
from models.codec.base import AudioCodec


# ---------------------------------------------------------------------------------------------- VAE (AutoencoderKL)
@dataclass
class MelVAEConfig:
    in_channels: int = 1
    latent_channels: int = 8
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config_from_diffusers(cfg: dict, source: str) -> MelVAEConfig:
    n = len(cfg.get("block_out_channels", [64]))
    if list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n or \
            list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        raise CheckpointError(f"{source}: only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported")
    if cfg.get("act_fn", "silu") != "silu" or int(cfg.get("in_channels", 1)) != int(cfg.get("out_channels", 1)):
        raise CheckpointError(f"{source}: VAE act_fn {cfg.get('act_fn')!r} / differing in/out channels not supported")
    return MelVAEConfig(in_channels=int(cfg.get("in_channels", 1)), latent_channels=int(cfg.get("latent_channels", 4)),
                        block_out_channels=list(cfg["block_out_channels"]),
                        layers_per_block=int(cfg.get("layers_per_block", 1)),
                        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
                        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)))


class SpatialAttention(nn.Module):
    """Single-head self-attention over all positions with a GroupNorm in front and a residual (the VAE mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (p(y)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w) + x


class VAEMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, 1e-6),
                                      ResnetBlock2D(channels, channels, None, groups, 1e-6)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)]) if attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if j == 0 else c_out, c_out, None, groups, 1e-6)
                                     for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=0)]) if down else None

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if j == 0 else c_out, c_out, None, groups, 1e-6)
                                     for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class VAEEncoder(nn.Module):
    def __init__(self, c: MelVAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g,
                                                      i < len(ch) - 1) for i in range(len(ch)))
        self.mid_block = VAEMidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    def __init__(self, c: MelVAEConfig):
        super().__init__()
        ch, g = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g,
                                                    i < len(ch) - 1) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class MelVAE(nn.Module):
    def __init__(self, config: MelVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = VAEEncoder(config)
        self.decoder = VAEDecoder(config)
        lat = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    def encode_mean(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.chunk(2, dim=1)[0]

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def vae_key(key: str) -> str:
    """Old diffusers attention names in VAE checkpoints (query/key/value/proj_attn) -> current ones."""
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                     (".proj_attn.", ".to_out.0.")):
        key = key.replace(old, new)
    return key


# ---------------------------------------------------------------------------------------------- HiFi-GAN vocoder
@dataclass
class HifiGanConfig:
    model_in_dim: int = 64
    sampling_rate: int = 16000
    upsample_initial_channel: int = 1024
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 8, 4, 4])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    leaky_relu_slope: float = 0.1
    normalize_before: bool = False

    @property
    def hop(self) -> int:
        return int(math.prod(self.upsample_rates))


def vocoder_config_from_transformers(cfg: dict, source: str) -> HifiGanConfig:
    fields = HifiGanConfig.__dataclass_fields__
    return HifiGanConfig(**{k: cfg[k] for k in fields if k in cfg})


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int], slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class HifiGan(nn.Module):
    """log-mel [B, T, n_mels] -> waveform [B, T * hop]."""

    def __init__(self, c: HifiGanConfig):
        super().__init__()
        self.config = c
        self.conv_pre = nn.Conv1d(c.model_in_dim, c.upsample_initial_channel, 7, padding=3)
        self.upsampler = nn.ModuleList(
            nn.ConvTranspose1d(c.upsample_initial_channel // 2 ** i, c.upsample_initial_channel // 2 ** (i + 1), k,
                               stride=r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(c.upsample_initial_channel // 2 ** (i + 1), k, d, c.leaky_relu_slope)
            for i in range(len(c.upsample_rates)) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(c.upsample_initial_channel // 2 ** len(c.upsample_rates), 1, 7, padding=3)
        self.register_buffer("mean", torch.zeros(c.model_in_dim))
        self.register_buffer("scale", torch.ones(c.model_in_dim))

    def forward(self, mel: Tensor) -> Tensor:
        c = self.config
        if c.normalize_before:
            mel = (mel - self.mean) / self.scale
        x = self.conv_pre(mel.transpose(1, 2))
        k = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, c.leaky_relu_slope))
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x))  # the final activation uses torch's default slope, as the reference
        return torch.tanh(x)[:, 0]


# ---------------------------------------------------------------------------------------------- audio helpers
def resample(wave: Tensor, sr_in: int, sr_out: int) -> Tensor:
    """Band-limited polyphase resampling along the last axis (scipy.signal.resample_poly, Kaiser window beta 5)."""
    if sr_in == sr_out:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(sr_out, sr_in)
    out = resample_poly(wave.detach().double().cpu().numpy(), ratio.numerator, ratio.denominator, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(wave.device, wave.dtype)


def to_mel_layout(latents: Tensor, bins: int) -> Tensor:
    """The project's channel-major latents [B, C*F, T] -> the mel VAE's and UNet's [B, C, T, F] (F = ``bins``)."""
    b, cf, t = latents.shape
    return latents.reshape(b, cf // bins, bins, t).transpose(2, 3)


def from_mel_layout(z: Tensor) -> Tensor:
    """[B, C, T, F] -> [B, C*F, T] (the inverse of ``to_mel_layout``)."""
    b, c, t, f = z.shape
    return z.transpose(2, 3).reshape(b, c * f, t)


def native_to_output(wave: Tensor, native_rate: int, sample_rate: int) -> Tensor:
    """The vocoder's mono [B, N] at its own rate -> the service's stereo [B, 2, M] at ``sample_rate`` (resampled,
    duplicated): the end of ``MelLatentCodec.decode``, and of an exported decoder graph's output."""
    return resample(wave, native_rate, sample_rate)[:, None].expand(-1, 2, -1)


class LogMel(nn.Module):
    """AudioLDM's analysis: reflect-padded STFT magnitude (periodic Hann), Slaney mel filters, log(max(x, 1e-5))."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.hop = n_fft, hop
        bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=fmin,
                               max_frequency=fmax, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_basis", torch.from_numpy(np.asarray(bank, dtype=np.float32).T), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:  # [B, N] -> [B, frames, n_mels]
        return self.log_mel(stft_magnitude(wave, self.n_fft, self.hop))

    def log_mel(self, magnitude: Tensor) -> Tensor:  # [B, K, frames] -> [B, frames, n_mels]
        return torch.log(torch.clamp(self.mel_basis @ magnitude, min=1e-5)).transpose(1, 2)


def stft_magnitude(wave: Tensor, n_fft: int, hop: int) -> Tensor:
    """AudioLDM's STFT magnitude [B, K, frames]: reflect-padded, periodic Hann."""
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=wave.device)
    return torch.stft(wave.float(), n_fft, hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs()


def encoder_input(wave: Tensor, sample_rate: int, native_rate: int, n_fft: int, hop: int, frames_per_latent: int,
                  samples_per_latent: int) -> Tensor:
    """What ``MelLatentCodec``'s encoder network reads: STFT magnitudes [B, K, frames x frames_per_latent] of the
    clip as mono at the vocoder's rate, centred and peak-normalised to 0.5, cut or padded to whole latent frames."""
    frames = -(-wave.shape[-1] // samples_per_latent)
    mono = resample(wave.mean(dim=1), sample_rate, native_rate)
    mono = mono - mono.mean(dim=-1, keepdim=True)
    mono = 0.5 * mono / (mono.abs().amax(dim=-1, keepdim=True) + 1e-8)
    need = frames * hop * frames_per_latent
    mono = F.pad(mono, (0, max(0, need - mono.shape[-1])))[:, :need]
    return stft_magnitude(mono, n_fft, hop)[..., : frames * frames_per_latent]


class MelLatentCodec(AudioCodec):
    def __init__(self, vae: MelVAE, vocoder: HifiGan, n_mels: int, sample_rate: int = 44100, n_fft: int = 1024,
                 fmin: float = 0.0, fmax: float = 8000.0):
        super().__init__()
        self.vae, self.vocoder = vae, vocoder
        f = vae.config.factor
        if n_mels % f:
            raise CheckpointError(f"{n_mels} mel bins are not divisible by the VAE's downsampling factor {f}")
        self.native_rate = vocoder.config.sampling_rate
        self.bins = n_mels // f
        self.channels = vae.config.latent_channels
        self.sample_rate = sample_rate
        self.audio_channels = 2
        self.latent_dim = self.channels * self.bins
        native_hop = vocoder.config.hop * f
        spl = Fraction(native_hop * sample_rate, self.native_rate)
        if spl.denominator != 1:
            raise CheckpointError(f"a latent frame spans {native_hop} samples at {self.native_rate} Hz, not a whole "
                                  f"number of samples at {sample_rate} Hz")
        self.samples_per_latent = int(spl)
        self.analysis = LogMel(self.native_rate, n_fft, vocoder.config.hop, n_mels, fmin, fmax)

    def to_mel_latents(self, latents: Tensor) -> Tensor:
        return to_mel_layout(latents, self.bins)

    def from_mel_latents(self, z: Tensor) -> Tensor:
        return from_mel_layout(z)

    def decode_native(self, latents: Tensor) -> Tensor:
        """Latents -> mono waveform at the vocoder's rate [B, mel frames x hop]. HiFi-GAN's transposed convolutions
        can add a few samples at the end (AudioLDM's: 160 L + 32 for L frames); like the reference pipelines this
        keeps the first frames x hop."""
        mel = self.vae.decode(self.to_mel_latents(latents) / self.vae.config.scaling_factor)[:, 0]
        wave = self.vocoder(mel)
        need = mel.shape[1] * self.vocoder.config.hop
        return F.pad(wave, (0, max(0, need - wave.shape[-1])))[:, :need]

    def decode(self, latents: Tensor) -> Tensor:
        return native_to_output(self.decode_native(latents), self.native_rate, self.sample_rate)

    @property
    def native_tail(self) -> dict:
        return {"native_rate": self.native_rate}

    def encode(self, wave: Tensor) -> Tensor:
        return self.encode_native(encoder_input(wave, self.sample_rate, self.native_rate, self.analysis.n_fft,
                                                self.vocoder.config.hop, self.vae.config.factor,
                                                self.samples_per_latent))

    def encode_native(self, magnitude: Tensor) -> Tensor:
        """The encoder network on ``encoder_input``'s magnitudes: log mel, the VAE's posterior mean, scaled."""
        mel = self.analysis.log_mel(magnitude)
        return self.from_mel_latents(self.vae.encode_mean(mel[:, None]) * self.vae.config.scaling_factor)
