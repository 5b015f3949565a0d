"""SAME, Stable Audio 3's autoencoder, as an ``AudioCodec``, written from its published structure.

encode: stereo wave -> patches (``patch_size`` consecutive samples of each channel become channels, no weights) ->
transformer resampling blocks (TRB) -> linear to the latent width -> soft-norm bottleneck (x * scale + bias, divided
by a stored running std). decode: the reverse (times the running std, linear, TRBs, un-patch).

A TRB in encoder mode maps the frames to its width (1x1 conv), cuts them into segments of ``stride`` frames, appends
one learned token to each segment and keeps only that token after its transformer layers: one latent per segment. In
decoder mode each latent is followed by ``stride`` learned tokens and those come out: ``stride`` frames per latent,
then the 1x1 conv back to the frame width. The layers are pre-norm (Dynamic Tanh: gamma tanh(alpha x) + beta),
differential self-attention (attn(q1, k1, v) - attn(q2, k2, v); DyT on q and k per head; rotary on the first
head_dim / 2 channels) and a gated feed-forward (SiLU gate, or sin(pi x) in the last ``sinusoidal_blocks`` layers).

Which tokens attend to which is the one difference between the published variants:
- ``band`` (SAME-L; and diffusers' ``AutoencoderSAME`` for both sizes): each token attends to the tokens within
  ``sliding_window`` segments of itself over the whole sequence (computed per segment over its neighbours, so memory
  grows linearly with the length);
- ``chunked`` (Stability's SAME-S, ``chunk_size`` > 0): the sequence is cut into chunks of ``chunk_size`` frames'
  worth of segments; the first half of the layers attend within a chunk, the second half within chunks shifted by
  half a chunk (the sequence extended at both ends by copies of its first and last half chunk), when
  ``chunk_midpoint_shift``.

Parameter names follow diffusers' ``AutoencoderSAME`` (its weight-normed 1x1 convs folded into plain weights at
load); Stability's single-file checkpoints are renamed by ``from_stability``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.stable_audio_dit import apply_rotary, rotary_tables
from models.checkpoints.stable_audio_3_dit import (
    Linear,
    attention_heads,
    check_frequency_table,
    inverse_frequencies,
    reorder_qkv,
)
from models.checkpoints.weights import fold_weight_norm
from models.codec.base import AudioCodec


@dataclass
class SAMEConfig:
    audio_channels: int = 2
    patch_size: int = 256
    channels: int = 128
    c_mults: list[int] = field(default_factory=lambda: [6])
    strides: list[int] = field(default_factory=lambda: [16])
    depths: list[int] = field(default_factory=lambda: [6])
    latent_dim: int = 256
    dim_heads: int = 64
    differential: bool = True
    ff_mult: float = 3.0
    sliding_window: int = 1  # band attention: segments on each side
    chunk_size: int = 0  # > 0: chunked attention over chunks of this many input frames (Stability's SAME-S)
    chunk_midpoint_shift: bool = False
    encoder_sinusoidal_blocks: list[int] = field(default_factory=lambda: [0])
    decoder_sinusoidal_blocks: list[int] = field(default_factory=lambda: [0])
    decoder_new_tokens: int = 1  # 1: one learned token shared by the stride positions; stride: one each
    sample_rate: int = 44100
    soft_clip: bool = False  # tanh on the decoded wave

    @property
    def hop(self) -> int:
        return self.patch_size * math.prod(self.strides)

    def widths(self) -> list[int]:
        return [self.audio_channels * self.patch_size] + [self.channels * m for m in self.c_mults]


class DynamicTanh(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def band_attention(q: Tensor, k: Tensor, v: Tensor, segment: int, window: int) -> Tensor:
    """Attention of each token to the tokens at most ``window`` segments of ``segment`` tokens away, computed per
    segment over its 2 window + 1 neighbouring segments: q, k, v [B, H, N, D] with N a multiple of ``segment``."""
    b, h, n, d = q.shape
    groups, span = n // segment, (2 * window + 1) * segment

    def neighbours(x: Tensor) -> Tensor:  # [B, H, G, span, D]: the segments g - window .. g + window
        x = F.pad(x, (0, 0, window * segment, window * segment)).view(b, h, groups + 2 * window, segment, d)
        return torch.cat([x[:, :, o: o + groups] for o in range(2 * window + 1)], dim=3)

    query = torch.arange(groups, device=q.device)[:, None, None] * segment + torch.arange(segment, device=q.device)[
        None, :, None]
    key = (torch.arange(groups, device=q.device)[:, None, None] - window) * segment + torch.arange(
        span, device=q.device)[None, None, :]
    mask = ((key - query).abs() <= window * segment) & (key >= 0) & (key < n)
    out = F.scaled_dot_product_attention(q.view(b, h, groups, segment, d), neighbours(k), neighbours(v),
                                         attn_mask=mask)
    return out.reshape(b, h, n, d)


class SAMEAttention(nn.Module):
    """Fused projection [q1 | q2 | k1 | k2 | v] (differential) or [q | k | v]."""

    def __init__(self, dim: int, dim_heads: int, differential: bool):
        super().__init__()
        self.heads, self.differential = dim // dim_heads, differential
        self.to_qkv = Linear(dim, dim * (5 if differential else 3), bias=False)
        self.to_out = Linear(dim, dim, bias=False)
        self.q_norm = DynamicTanh(dim_heads)
        self.k_norm = DynamicTanh(dim_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, band: tuple[int, int] | None) -> Tensor:
        rope = rotary_tables(q.shape[2], q.shape[3] // 2, q.device, q.shape[3])
        q, k = apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope)
        return F.scaled_dot_product_attention(q, k, v) if band is None else band_attention(q, k, v, *band)

    def forward(self, x: Tensor, band: tuple[int, int] | None) -> Tensor:
        parts = [attention_heads(p, self.heads) for p in self.to_qkv(x).chunk(5 if self.differential else 3, -1)]
        if self.differential:
            q1, q2, k1, k2, v = parts
            out = self.attend(q1, k1, v, band) - self.attend(q2, k2, v, band)
        else:
            out = self.attend(*parts, band)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GatedFeedForward(nn.Module):
    def __init__(self, dim: int, mult: float, sinusoidal: bool):
        super().__init__()
        inner = int(dim * mult)
        self.sinusoidal = sinusoidal
        self.proj_in = Linear(dim, 2 * inner)
        self.proj_out = Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * (torch.sin(math.pi * gate) if self.sinusoidal else F.silu(gate)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, dim_heads: int, differential: bool, ff_mult: float, sinusoidal: bool):
        super().__init__()
        self.norm_attn = DynamicTanh(dim)
        self.attn = SAMEAttention(dim, dim_heads, differential)
        self.norm_ff = DynamicTanh(dim)
        self.ff = GatedFeedForward(dim, ff_mult, sinusoidal)

    def forward(self, x: Tensor, band: tuple[int, int] | None) -> Tensor:
        x = x + self.attn(self.norm_attn(x), band)
        return x + self.ff(self.norm_ff(x))


class ResamplingBlock(nn.Module):
    """One TRB (see the module docstring): encoder mode [B, C_in, T] -> [B, C_out, ceil(T / stride)], decoder mode
    [B, C_in, T] -> [B, C_out, T * stride]."""

    def __init__(self, c: SAMEConfig, c_in: int, c_out: int, stride: int, depth: int, sinusoidal: int, mode: str):
        super().__init__()
        self.mode, self.stride, self.config = mode, stride, c
        width = c_out if mode == "encoder" else c_in
        self.mapping = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.transformers = nn.ModuleList(
            TransformerBlock(width, min(c.dim_heads, width), c.differential, c.ff_mult, depth - i < sinusoidal)
            for i in range(depth))
        tokens = 1 if mode == "encoder" else c.decoder_new_tokens
        self.new_tokens = nn.Parameter(1e-5 * torch.randn(1, tokens, width))

    @property
    def segment(self) -> int:
        """Tokens per segment: ``stride`` frames and one learned token, or one latent and ``stride`` tokens."""
        return self.stride + 1

    def run_layers(self, x: Tensor) -> Tensor:
        """The transformer layers over the segment sequence x [B, N, D] (N a multiple of the attention unit)."""
        c = self.config
        if not c.chunk_size:
            for layer in self.transformers:
                x = layer(x, (self.segment, c.sliding_window))
            return x
        b, n, d = x.shape
        chunk = c.chunk_size // self.stride * self.segment
        split = len(self.transformers) // 2 if c.chunk_midpoint_shift else len(self.transformers)
        x = x.reshape(-1, chunk, d)
        for layer in self.transformers[:split]:
            x = layer(x, None)
        x = x.reshape(b, n, d)
        if split == len(self.transformers):
            return x
        half = chunk // 2
        x = torch.cat([x[:, :half], x, x[:, n - half:]], dim=1).reshape(-1, chunk, d)
        for layer in self.transformers[split:]:
            x = layer(x, None)
        return x.reshape(b, n + chunk, d)[:, half: half + n]

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.config, self.stride
        length = x.shape[-1]
        if self.mode == "encoder":
            unit = c.chunk_size or s  # frames: a chunk, or a segment
            x = self.mapping(F.pad(x, (0, -length % unit)))
            b, d, n = x.shape
            seq = torch.cat([x.transpose(1, 2).reshape(b, n // s, s, d), self.new_tokens.expand(b, n // s, 1, d)], 2)
            seq = self.run_layers(seq.reshape(b, -1, d)).view(b, n // s, self.segment, d)
            return seq[:, :, -1].transpose(1, 2)[:, :, : -(-length // s)]
        unit = c.chunk_size // s if c.chunk_size else 1  # latents: a chunk, or one
        x = F.pad(x, (0, -length % unit))
        b, d, n = x.shape
        seq = torch.cat([x.transpose(1, 2)[:, :, None], self.new_tokens[:, None].expand(b, n, s, d)], dim=2)
        seq = self.run_layers(seq.reshape(b, -1, d)).view(b, n, self.segment, d)
        return self.mapping(seq[:, :, 1:].reshape(b, n * s, d).transpose(1, 2)[:, :, : length * s])


class SAMEEncoder(nn.Module):
    def __init__(self, c: SAMEConfig):
        super().__init__()
        w = c.widths()
        self.blocks = nn.ModuleList(
            ResamplingBlock(c, w[i], w[i + 1], c.strides[i], c.depths[i], per_level(c.encoder_sinusoidal_blocks, i),
                            "encoder") for i in range(len(c.strides)))
        self.proj = Linear(w[-1], c.latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


class SAMEDecoder(nn.Module):
    def __init__(self, c: SAMEConfig):
        super().__init__()
        w = c.widths()
        self.proj = Linear(c.latent_dim, w[-1])
        self.blocks = nn.ModuleList(
            ResamplingBlock(c, w[i + 1], w[i], c.strides[i], c.depths[i], per_level(c.decoder_sinusoidal_blocks, i),
                            "decoder") for i in reversed(range(len(c.strides))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


def per_level(values: list[int], level: int) -> int:
    """A per-TRB-level setting given once for all levels or once per level."""
    return int(values[0] if len(values) == 1 else values[level])


class SoftNormBottleneck(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dim, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1))
        self.register_buffer("running_std", torch.ones(1))


class SAMECodec(AudioCodec):
    """Waveform [B, 2, N] <-> latents [B, latent_dim, ceil(N / hop)] at ``sample_rate / hop`` frames per second."""

    def __init__(self, config: SAMEConfig):
        super().__init__()
        for name in ("c_mults", "depths"):
            if len(getattr(config, name)) != len(config.strides):
                raise ValueError(f"SAME config: {name} and strides must have the same length")
        if config.chunk_size and any(config.chunk_size % s for s in config.strides):
            raise ValueError(f"SAME config: chunk_size {config.chunk_size} is not a multiple of every stride")
        self.config, self.samples_per_latent = config, config.hop
        self.sample_rate, self.audio_channels, self.latent_dim = config.sample_rate, config.audio_channels, \
            config.latent_dim
        self.encoder = SAMEEncoder(config)
        self.bottleneck = SoftNormBottleneck(config.latent_dim)
        self.decoder = SAMEDecoder(config)

    def encode(self, wave: Tensor) -> Tensor:
        p = self.config.patch_size
        x = F.pad(wave, (0, -wave.shape[-1] % p))
        b, ch, n = x.shape
        x = x.view(b, ch, n // p, p).transpose(2, 3).reshape(b, ch * p, n // p)
        x = self.encoder(x)
        return (x * self.bottleneck.scale + self.bottleneck.bias) / self.bottleneck.running_std

    def decode(self, latents: Tensor) -> Tensor:
        x = self.decoder(latents * self.bottleneck.running_std)
        b, cp, n = x.shape
        p = self.config.patch_size
        wave = x.view(b, cp // p, p, n).transpose(2, 3).reshape(b, cp // p, n * p)
        return torch.tanh(wave) if self.config.soft_clip else wave


# ---------------------------------------------------------------------------------------------- published layouts
def from_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderSAME`` weights -> ours: the same names, weight-normed convs folded."""
    return fold_weight_norm(state)


STABILITY_LAYER_RENAMES = (("pre_norm.", "norm_attn."), ("self_attn.", "attn."), ("ff_norm.", "norm_ff."),
                           ("ff.ff.0.proj.", "ff.proj_in."), ("ff.ff.2.", "ff.proj_out."))


def from_stability(state: dict[str, Tensor], config: SAMEConfig, source: str, origin: dict[str, str],
                   prefix: str = "pretransform.model.") -> dict[str, Tensor]:
    """The autoencoder's part of a Stability checkpoint (keys after ``prefix``) -> ours. The reference keeps its
    TRBs and linear layers in one list per side: encoder [TRB..., transpose, linear, transpose], decoder [transpose,
    linear, transpose, TRB...], and a rotary table in every layer. Unknown keys are kept for the strict fit to name;
    ``origin`` maps ours -> the file's."""
    levels = len(config.strides)
    out: dict[str, Tensor] = {}
    for key, value in fold_weight_norm(state).items():
        new = {"bottleneck.scaling_factor": "bottleneck.scale"}.get(key, key)
        if key == "bottleneck.noise_scaling_factor" and value.numel() == 0:
            continue  # the noise-augmentation scale of zero extra channels
        side, _, rest = key.partition(".layers.")
        index, _, inner = rest.partition(".")
        if side in ("encoder", "decoder") and index.isdigit():
            i, linear = int(index), (levels + 1 if side == "encoder" else 1)
            level = i if side == "encoder" else levels - 1 - (i - 3)
            if i == linear:
                new = f"{side}.proj.{inner}"
            elif 0 <= level < levels and (side == "encoder") == (i < levels):
                if inner.endswith(".rope.inv_freq"):
                    heads = min(config.dim_heads, config.channels * config.c_mults[level])
                    check_frequency_table(value, heads // 2, source, prefix + key)
                    continue
                for old, renamed in STABILITY_LAYER_RENAMES:
                    inner = inner.replace(old, renamed, 1)
                new = f"{side}.blocks.{i if side == 'encoder' else i - 3}.{inner}"
                if inner.endswith("attn.to_qkv.weight") and config.differential:
                    value = reorder_qkv(value)
        out[new] = value
        origin[new] = prefix + key
    return out


def to_stability(state: dict[str, Tensor], config: SAMEConfig) -> dict[str, Tensor]:
    """Ours -> the autoencoder's keys in a Stability checkpoint (after ``pretransform.model.``; the inverse of
    ``from_stability``, with each layer's rotary table)."""
    levels = len(config.strides)
    out: dict[str, Tensor] = {}
    for key, value in weight_normed(state).items():
        side, _, rest = key.partition(".")
        part, _, inner = rest.partition(".")
        if key == "bottleneck.scale":
            key = "bottleneck.scaling_factor"
        elif side in ("encoder", "decoder") and part == "proj":
            key = f"{side}.layers.{levels + 1 if side == 'encoder' else 1}.{inner}"
        elif side in ("encoder", "decoder"):
            index, _, inner = inner.partition(".")
            for old, renamed in STABILITY_LAYER_RENAMES:
                inner = inner.replace(renamed, old, 1)
            if inner.endswith("self_attn.to_qkv.weight") and config.differential:
                value = reorder_qkv(value, to_stability=True)
            key = f"{side}.layers.{int(index) + (0 if side == 'encoder' else 3)}.{inner}"
        out[key] = value
    out["bottleneck.noise_scaling_factor"] = torch.ones(1, 0, 1)  # the reference's noise augmentation, of no channels
    for side, offset in (("encoder", 0), ("decoder", 3)):
        for i in range(levels):
            level = i if side == "encoder" else levels - 1 - i
            heads = min(config.dim_heads, config.channels * config.c_mults[level])
            for j in range(config.depths[level]):
                out[f"{side}.layers.{i + offset}.transformers.{j}.rope.inv_freq"] = inverse_frequencies(heads // 2)
    return out


def weight_normed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 1x1 mapping convs weight-normed (``weight_g`` / ``weight_v``, the norm over all but the output channel),
    as both references save them."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("mapping.weight"):
            stem = key[: -len("weight")]
            out[stem + "weight_g"] = torch.linalg.vector_norm(value, dim=(1, 2), keepdim=True)
            out[stem + "weight_v"] = value
        else:
            out[key] = value
    return out


def to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> diffusers' ``AutoencoderSAME`` state (its mapping convs weight-normed)."""
    return weight_normed(state)


def config_from_diffusers(cfg: dict) -> SAMEConfig:
    """Ours from a diffusers ``AutoencoderSAME`` config.json (vae/config.json): band attention, one shared
    decoder token (diffusers has no chunked attention: it runs SAME-S with the band as well)."""
    return SAMEConfig(
        audio_channels=int(cfg.get("audio_channels", 2)), patch_size=int(cfg.get("patch_size", 256)),
        channels=int(cfg.get("encoder_channels", 128)), c_mults=list(cfg.get("encoder_c_mults", [6])),
        strides=list(cfg.get("encoder_strides", [16])), depths=list(cfg.get("encoder_transformer_depths", [6])),
        latent_dim=int(cfg.get("latent_dim", 256)), dim_heads=int(cfg.get("dim_heads", 64)),
        differential=bool(cfg.get("use_differential_attention", True)), ff_mult=float(cfg.get("ff_mult", 3)),
        sliding_window=int(cfg.get("sliding_window", 1)),
        encoder_sinusoidal_blocks=list(cfg.get("encoder_sinusoidal_blocks", [0])),
        decoder_sinusoidal_blocks=list(cfg.get("decoder_sinusoidal_blocks", [0])),
        sample_rate=int(cfg.get("sampling_rate", 44100)))


def diffusers_config(c: SAMEConfig) -> dict:
    """The diffusers config.json of a band-attention SAME (the inverse of ``config_from_diffusers``)."""
    return {"_class_name": "AutoencoderSAME", "audio_channels": c.audio_channels, "patch_size": c.patch_size,
            "encoder_channels": c.channels, "encoder_c_mults": c.c_mults, "encoder_strides": c.strides,
            "encoder_transformer_depths": c.depths, "latent_dim": c.latent_dim,
            "use_differential_attention": c.differential, "dim_heads": c.dim_heads, "ff_mult": c.ff_mult,
            "sliding_window": c.sliding_window, "encoder_sinusoidal_blocks": c.encoder_sinusoidal_blocks,
            "decoder_sinusoidal_blocks": c.decoder_sinusoidal_blocks, "sampling_rate": c.sample_rate}
