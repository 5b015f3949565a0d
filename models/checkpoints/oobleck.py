"""The Oobleck VAE (Stable Audio's autoencoder) as an ``AudioCodec``, written from its published structure.

Encoder: conv7 -> per stride s: three residual units (dilations 1, 3, 9; each snake -> conv7 -> snake -> conv1,
residual) -> snake -> strided conv (kernel 2s) -> snake -> conv3 to 2 x latent channels (mean, scale).
Decoder: the mirror image with transposed convolutions; snake activations x + sin^2(a x) / b with log-scale a, b.
Parameter names follow diffusers' ``AutoencoderOobleck`` (weight norm folded into plain weights at load);
stable-audio-tools' ``OobleckEncoder``/``OobleckDecoder`` names are translated by ``stable_audio_tools_key``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.checkpoints.snake import SNAKE_EPS, fused_snake, snake_constants
from models.checkpoints.weights import CheckpointError
from models.codec.base import AudioCodec


HALF_TYPES = (torch.bfloat16, torch.float16)


@dataclass
class OobleckConfig:
    channels: int = 128
    c_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    strides: list[int] = field(default_factory=lambda: [2, 4, 4, 8, 8])
    latent_dim: int = 64
    audio_channels: int = 2
    sample_rate: int = 44100
    use_snake: bool = True
    final_tanh: bool = False
    soft_clip: bool = False
    scale: float = 1.0  # latents seen by the diffusion model are encoder latents / scale

    @property
    def hop(self) -> int:
        return int(math.prod(self.strides))


class Snake(nn.Module):
    """``x + sin^2(a x) / b`` per channel with log-scale parameters: a = exp(alpha), b = exp(beta) + 1e-9.

    ``prepare`` (called by ``OobleckCodec.prepare_inference``) keeps a and 1/b as non-persistent buffers, so that an
    eval-mode forward computes no exponential and runs the fused form (``models.checkpoints.snake``); the state dict
    is unchanged. Training mode always runs the expression as written (gradients reach alpha and beta) and drops the
    constants; a change to alpha or beta in place (a loaded state dict) is noticed and the constants recomputed.
    ``out_dtype`` (None: the input's type) lets the decoder's last snake hand float32 to its float32 output layer."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.register_buffer("a", None, persistent=False)
        self.register_buffer("inv_b", None, persistent=False)
        self.out_dtype: torch.dtype | None = None
        self._prepared_from: tuple[int, int] | None = None

    def prepare(self) -> None:
        with torch.inference_mode(False):  # ordinary tensors, even when prepared under inference mode
            self.a, self.inv_b = snake_constants(self.alpha, self.beta)
        self._prepared_from = self._versions()

    def _versions(self) -> tuple[int, int] | None:
        """alpha's and beta's in-place change counters; None for inference tensors, which keep none (they were made
        under inference mode and can be changed only there)."""
        if self.alpha.is_inference() or self.beta.is_inference():
            return None
        return self.alpha._version, self.beta._version

    def release(self) -> None:
        self.a = self.inv_b = self._prepared_from = None

    def train(self, mode: bool = True) -> Snake:
        if mode:
            self.release()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.a is None:
            return x + (self.beta.exp() + SNAKE_EPS).reciprocal() * torch.sin(self.alpha.exp() * x).pow(2)
        if self._versions() != self._prepared_from:
            self.prepare()
        return fused_snake(x, self.a, self.inv_b, self.out_dtype)


def _act(channels: int, snake: bool) -> nn.Module:
    return Snake(channels) if snake else nn.ELU()


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int, snake: bool):
        super().__init__()
        self.snake1 = _act(dim, snake)
        self.conv1 = nn.Conv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = _act(dim, snake)
        self.conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, stride: int, snake: bool):
        super().__init__()
        self.res_unit1 = ResidualUnit(dim_in, 1, snake)
        self.res_unit2 = ResidualUnit(dim_in, 3, snake)
        self.res_unit3 = ResidualUnit(dim_in, 9, snake)
        self.snake1 = _act(dim_in, snake)
        self.conv1 = nn.Conv1d(dim_in, dim_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(self.snake1(self.res_unit3(self.res_unit2(self.res_unit1(x)))))


class DecoderBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, stride: int, snake: bool):
        super().__init__()
        self.snake1 = _act(dim_in, snake)
        self.conv_t1 = nn.ConvTranspose1d(dim_in, dim_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))
        self.res_unit1 = ResidualUnit(dim_out, 1, snake)
        self.res_unit2 = ResidualUnit(dim_out, 3, snake)
        self.res_unit3 = ResidualUnit(dim_out, 9, snake)

    def forward(self, x: Tensor) -> Tensor:
        return self.res_unit3(self.res_unit2(self.res_unit1(self.conv_t1(self.snake1(x)))))


class OobleckEncoder(nn.Module):
    def __init__(self, c: OobleckConfig):
        super().__init__()
        mults = [1] + list(c.c_mults)
        self.conv1 = nn.Conv1d(c.audio_channels, c.channels, 7, padding=3)
        self.block = nn.ModuleList(EncoderBlock(c.channels * mults[i], c.channels * mults[i + 1], s, c.use_snake)
                                   for i, s in enumerate(c.strides))
        self.snake1 = _act(c.channels * mults[-1], c.use_snake)
        self.conv2 = nn.Conv1d(c.channels * mults[-1], 2 * c.latent_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class OobleckDecoder(nn.Module):
    def __init__(self, c: OobleckConfig):
        super().__init__()
        mults = [1] + list(c.c_mults)
        n = len(c.strides)
        self.conv1 = nn.Conv1d(c.latent_dim, c.channels * mults[-1], 7, padding=3)
        self.block = nn.ModuleList(
            DecoderBlock(c.channels * mults[n - i], c.channels * mults[n - i - 1], s, c.use_snake)
            for i, s in enumerate(reversed(c.strides)))
        self.snake1 = _act(c.channels, c.use_snake)
        self.conv2 = nn.Conv1d(c.channels, c.audio_channels, 7, padding=3, bias=False)
        self.final_tanh = c.final_tanh

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # a 16-bit decoder (OobleckCodec.prepare_inference) still answers in the latents' type
        x = self.conv1(x.to(self.conv1.weight.dtype))
        for block in self.block:
            x = block(x)
        x = self.conv2(self.snake1(x).to(self.conv2.weight.dtype)).to(dtype)
        return torch.tanh(x) if self.final_tanh else x


class OobleckCodec(AudioCodec):
    """Waveform <-> latents at ``sample_rate / hop`` frames per second. ``encode`` returns the posterior mean (the
    deterministic choice; the references sample around it in training) divided by the pretransform scale."""

    def __init__(self, config: OobleckConfig):
        super().__init__()
        if len(config.c_mults) != len(config.strides):
            raise ValueError("c_mults and strides must have the same length")
        self.config = config
        self.sample_rate = config.sample_rate
        self.audio_channels = config.audio_channels
        self.latent_dim = config.latent_dim
        self.samples_per_latent = config.hop
        self.encoder = OobleckEncoder(config)
        self.decoder = OobleckDecoder(config)

    def encode(self, wave: Tensor) -> Tensor:
        wave = _match_channels(wave, self.audio_channels)
        pad = self.latent_frames(wave.shape[-1]) * self.samples_per_latent - wave.shape[-1]
        mean, _ = self.encoder(torch.nn.functional.pad(wave, (0, pad))).chunk(2, dim=1)
        return mean / self.config.scale

    def prepare_inference(self, dtype: torch.dtype | None = None) -> OobleckCodec:
        """Eval mode with every snake's constants computed once (``Snake.prepare``: exact, so always worth it), and
        the decoder's weights in ``dtype`` (None: as they are). bfloat16 / float16 halve the decoder's memory traffic
        and run its convolutions on tensor cores, without autocast (no per-call weight casts). Its snakes still
        compute in float32 and store the 16-bit type; the last snake hands float32 to the output convolution, which
        stays float32 (two output channels: a small share of the work, and the output's own rounding would otherwise
        add to the error). ``decode`` still takes and returns float32; the encoder stays float32. The cast is in
        place and one-way: float32 weights come back only by loading them again. float16 keeps three more mantissa
        bits than bfloat16, about 18 dB more signal-to-noise against float32 (benchmarks/decoder_precision.py), and is
        the type of Stable Audio's own half-precision VAE (``model_half``).

        Not done: channels-last. Its layouts are for 4-D (and 5-D) tensors; a 1-D convolution would have to be run
        as a 2-D one over [B, C, 1, T] to use it, and whether cuDNN's NHWC kernels then beat its own choice for
        Conv1d is a question for a profiler on the GPU. Nor are the transposed convolutions rewritten as plain
        convolutions plus a reshape (kernel 2s, stride s: a two-tap convolution to s x the output channels, then
        interleaved): on a 2-core CPU (torch 2.13, SAO-small's decoder) that form ran each of its five layers
        1.04-1.5x faster but a whole decode only 1-4 % faster (the kernel-7 convolutions dominate), not worth a
        second copy of their weights; on a GPU it waits for a profile that shows cuDNN's transposed kernels slow."""
        current = self.decoder_dtype
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"decoder dtype {dtype}: expected float32, bfloat16 or float16")
        if dtype is not None and current in HALF_TYPES and dtype != current:
            raise ValueError(f"the decoder's weights were cast to {current}; load the codec again for {dtype}")
        self.eval()
        for module in self.modules():
            if isinstance(module, Snake):
                module.prepare()
        for name, module in self.decoder.named_modules():
            if dtype is not None and isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and name != "conv2":
                module.to(dtype)
        if isinstance(self.decoder.snake1, Snake):
            self.decoder.snake1.out_dtype = self.decoder.conv2.weight.dtype
        return self

    @property
    def decoder_dtype(self) -> torch.dtype:
        """The type the decoder's convolutions run in (``prepare_inference``)."""
        return self.decoder.conv1.weight.dtype

    def decode(self, latents: Tensor) -> Tensor:
        wave = self.decoder(latents * self.config.scale)
        if self.config.soft_clip:
            wave = torch.tanh(wave)
        return _match_channels(wave, 2)


def _match_channels(wave: Tensor, channels: int) -> Tensor:
    if wave.shape[1] == channels:
        return wave
    if channels == 1:
        return wave.mean(dim=1, keepdim=True)
    return wave.expand(-1, channels, -1) if wave.shape[1] == 1 else wave[:, :channels]


# ---------------------------------------------------------------------------------------------- configs and keys
def config_from_stable_audio_tools(pretransform: dict, sample_rate: int, source: str) -> OobleckConfig:
    """From the ``model.pretransform`` block of a stable-audio-tools model_config.json."""
    if pretransform.get("type") != "autoencoder":
        raise CheckpointError(f"{source}: pretransform type {pretransform.get('type')!r} is not supported "
                              "(only 'autoencoder' with an Oobleck encoder/decoder)")
    ae = pretransform.get("config", {})
    enc, dec = ae.get("encoder", {}), ae.get("decoder", {})
    if enc.get("type") != "oobleck" or dec.get("type") != "oobleck":
        raise CheckpointError(f"{source}: only Oobleck autoencoders are supported, found encoder "
                              f"{enc.get('type')!r} / decoder {dec.get('type')!r}")
    bottleneck = (ae.get("bottleneck") or {}).get("type")
    if bottleneck != "vae":
        raise CheckpointError(f"{source}: bottleneck {bottleneck!r} is not supported (only 'vae')")
    if ae.get("pretransform"):
        raise CheckpointError(f"{source}: a nested pretransform inside the autoencoder is not supported")
    e, d = enc.get("config", {}), dec.get("config", {})
    for side in (e, d):
        if side.get("antialias_activation") or side.get("use_nearest_upsample"):
            raise CheckpointError(f"{source}: antialiased activations / nearest upsampling are not supported")
    channels, mults = int(d.get("channels", 128)), list(d.get("c_mults", [1, 2, 4, 8]))
    strides = list(d.get("strides", [2, 4, 8, 8]))
    latent = int(ae.get("latent_dim", d.get("latent_dim", 32)))
    if (int(e.get("channels", 128)), list(e.get("c_mults", [1, 2, 4, 8])), list(e.get("strides", [2, 4, 8, 8]))) != \
            (channels, mults, strides) or bool(e.get("use_snake", False)) != bool(d.get("use_snake", False)):
        raise CheckpointError(f"{source}: encoder and decoder of different shapes are not supported")
    if int(e.get("latent_dim", 2 * latent)) != 2 * latent:
        raise CheckpointError(f"{source}: encoder latent_dim {e.get('latent_dim')} does not match the VAE bottleneck "
                              f"(2 x {latent})")
    io = int(ae.get("io_channels", 2))
    hop = int(math.prod(strides))
    if int(ae.get("downsampling_ratio", hop)) != hop:
        raise CheckpointError(f"{source}: downsampling_ratio {ae.get('downsampling_ratio')} != product of strides "
                              f"{hop}")
    return OobleckConfig(channels=channels, c_mults=mults, strides=strides, latent_dim=latent, audio_channels=io,
                         sample_rate=int(sample_rate), use_snake=bool(d.get("use_snake", False)),
                         final_tanh=bool(d.get("final_tanh", True)), soft_clip=bool(d.get("soft_clip", False)),
                         scale=float(pretransform.get("scale", 1.0)))


def config_from_diffusers(cfg: dict, source: str) -> OobleckConfig:
    """From a diffusers ``AutoencoderOobleck`` config.json (vae/config.json)."""
    latent = int(cfg.get("decoder_input_channels", 64))
    if int(cfg.get("encoder_hidden_size", 128)) != int(cfg.get("decoder_channels", 128)):
        raise CheckpointError(f"{source}: encoder_hidden_size != decoder_channels is not supported")
    if int(cfg.get("encoder_hidden_size", 128)) != 2 * latent:
        # diffusers' encoder ends in encoder_hidden_size channels, which must hold the (mean, scale) pair
        raise CheckpointError(f"{source}: encoder_hidden_size {cfg.get('encoder_hidden_size')} != 2 x "
                              f"decoder_input_channels {latent}")
    return OobleckConfig(channels=int(cfg.get("decoder_channels", 128)),
                         c_mults=list(cfg.get("channel_multiples", [1, 2, 4, 8, 16])),
                         strides=list(cfg.get("downsampling_ratios", [2, 4, 4, 8, 8])), latent_dim=latent,
                         audio_channels=int(cfg.get("audio_channels", 2)),
                         sample_rate=int(cfg.get("sampling_rate", 44100)), use_snake=True, final_tanh=False)


def stable_audio_tools_key(key: str, n_blocks: int) -> str | None:
    """An ``OobleckEncoder``/``OobleckDecoder`` key of stable-audio-tools (``encoder.layers.i...``) -> ours, after
    weight norm has been folded. Returns None for keys it does not recognise (the strict fit then names them)."""
    parts = key.split(".")
    if len(parts) < 4 or parts[0] not in ("encoder", "decoder") or parts[1] != "layers":
        return None
    side, i, rest = parts[0], int(parts[2]), parts[3:]
    if i == 0:
        return f"{side}.conv1.{'.'.join(rest)}"
    if i == n_blocks + 1:
        return f"{side}.snake1.{'.'.join(rest)}"
    if i == n_blocks + 2:
        return f"{side}.conv2.{'.'.join(rest)}"
    if not 1 <= i <= n_blocks or rest[0] != "layers":
        return None
    j, tail = int(rest[1]), rest[2:]
    block = f"{side}.block.{i - 1}"
    if side == "encoder":
        names = {0: "res_unit1", 1: "res_unit2", 2: "res_unit3", 3: "snake1", 4: "conv1"}
    else:
        names = {0: "snake1", 1: "conv_t1", 2: "res_unit1", 3: "res_unit2", 4: "res_unit3"}
    if j not in names:
        return None
    if names[j].startswith("res_unit"):
        if tail[0] != "layers":
            return None
        unit = {0: "snake1", 1: "conv1", 2: "snake2", 3: "conv2"}.get(int(tail[1]))
        return None if unit is None else f"{block}.{names[j]}.{unit}.{'.'.join(tail[2:])}"
    return f"{block}.{names[j]}.{'.'.join(tail)}"


def reshape_snake(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """stable-audio-tools stores snake alpha/beta as [C]; ours (like diffusers) as [1, C, 1]."""
    return {k: (v[None, :, None] if k.rsplit(".", 1)[-1] in ("alpha", "beta") and v.dim() == 1 else v)
            for k, v in state_dict.items()}
