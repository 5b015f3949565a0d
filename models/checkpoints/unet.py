"""The 2D text-conditioned UNet of Stable-Diffusion-style latent models (Tango, AudioLDM-style), written from its
published structure with diffusers' ``UNet2DConditionModel`` parameter names so that its checkpoints load as they are.

Covered: the standard down/up stacks (``CrossAttnDownBlock2D``, ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``UpBlock2D``, ``CrossAttnUpBlock2D``), sinusoidal time embedding, linear or 1x1-conv transformer projections,
GEGLU feed-forward, cross-attention masks. Anything else in a config (class or addition embeddings, dual attention,
other block types) is refused with a clear error. As in diffusers, ``attention_head_dim`` of the config is the number
of heads (a historical naming slip the published configs rely on).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.weights import CheckpointError

DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig:
    in_channels: int = 8
    out_channels: int = 8
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    heads: list[int] = field(default_factory=lambda: [5, 10, 20, 20])
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    center_input_sample: bool = False


_UNSUPPORTED_DEFAULTS = {
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "act_fn": "silu", "dropout": 0.0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}


def config_from_diffusers(cfg: dict, source: str) -> UNetConfig:
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if cfg.get(key, default) != default:
            raise CheckpointError(f"{source}: UNet option {key}={cfg[key]!r} is not supported")
    down, up = list(cfg.get("down_block_types", UNetConfig().down_block_types)), list(cfg.get("up_block_types",
                                                                                             UNetConfig().up_block_types))
    if any(b not in DOWN for b in down) or any(b not in UP for b in up) or len(down) != len(up):
        raise CheckpointError(f"{source}: UNet blocks {down} / {up} are not supported (only {DOWN} / {UP})")
    channels = list(cfg.get("block_out_channels", [320, 640, 1280, 1280]))
    heads = cfg.get("attention_head_dim", 8)
    heads = [int(heads)] * len(down) if isinstance(heads, int) else [int(h) for h in heads]
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "only_cross_attention"):
        if isinstance(cfg.get(name), (list, tuple)) and len(set(map(str, cfg[name]))) > 1:
            raise CheckpointError(f"{source}: per-block {name} values {cfg[name]} are not supported")
    def first(name, default):
        v = cfg.get(name, default)
        return v[0] if isinstance(v, (list, tuple)) else v
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        down_block_types=down, up_block_types=up, block_out_channels=channels,
        layers_per_block=int(first("layers_per_block", 2)), heads=heads,
        cross_attention_dim=int(first("cross_attention_dim", 1280)),
        transformer_layers_per_block=int(first("transformer_layers_per_block", 1)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        only_cross_attention=bool(first("only_cross_attention", False)),
        center_input_sample=bool(cfg.get("center_input_sample", False)))


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ time embedding) -> GroupNorm -> SiLU -> conv3x3, plus a 1x1 shortcut when the
    width changes; divided by ``output_scale_factor``."""

    def __init__(self, c_in: int, c_out: int, temb: int | None, groups: int, eps: float, scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out) if temb else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.scale = scale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.scale


class Attention(nn.Module):
    """diffusers ``Attention`` with the default processor: q/k/v projections (biases optional), SDPA with an
    additive key mask, output projection ``to_out.0``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (y.view(b, y.shape[1], self.heads, -1).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, only_cross: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross else None)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, context if self.only_cross else None)  # the self-attention mask is never set
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, heads: int, channels: int, depth: int, context_dim: int, groups: int, linear: bool,
                 only_cross: bool):
        super().__init__()
        head_dim = channels // heads
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_dim, context_dim, only_cross) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        if self.linear:
            h = self.proj_out(h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2).contiguous())
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, c: UNetConfig, i: int, c_in: int, c_out: int, temb: int, attn: bool, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if j == 0 else c_out, c_out, temb, c.norm_num_groups,
                                                   c.norm_eps) for j in range(c.layers_per_block))
        self.attentions = nn.ModuleList(
            Transformer2DModel(c.heads[i], c_out, c.transformer_layers_per_block, c.cross_attention_dim,
                               c.norm_num_groups, c.use_linear_projection, c.only_cross_attention)
            for _ in range(c.layers_per_block)) if attn else None
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(c_out, c.downsample_padding)])

    def forward(self, x, temb, context, bias):
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bias)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    def __init__(self, c: UNetConfig, i: int, c_in: int, c_out: int, c_prev: int, temb: int, attn: bool,
                 last: bool, heads: int):
        super().__init__()
        n = c.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((c_prev if j == 0 else c_out) + (c_in if j == n - 1 else c_out), c_out, temb,
                          c.norm_num_groups, c.norm_eps) for j in range(n))
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, c_out, c.transformer_layers_per_block, c.cross_attention_dim,
                               c.norm_num_groups, c.use_linear_projection, c.only_cross_attention)
            for _ in range(n)) if attn else None
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(c_out)])

    def forward(self, x, skips, temb, context, bias, size):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    def __init__(self, c: UNetConfig, channels: int, temb: int):
        super().__init__()
        g, e, s = c.norm_num_groups, c.norm_eps, c.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb, g, e, s),
                                      ResnetBlock2D(channels, channels, temb, g, e, s)])
        self.attentions = nn.ModuleList([Transformer2DModel(c.heads[-1], channels, c.transformer_layers_per_block,
                                                            c.cross_attention_dim, g, c.use_linear_projection, False)])

    def forward(self, x, temb, context, bias):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context, bias), temb)


class UNet2DCondition(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        ch = c.block_out_channels
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(c.down_block_types):
            prev, out = out, ch[i]
            self.down_blocks.append(DownBlock(c, i, prev, out, temb, kind.startswith("CrossAttn"), i == len(ch) - 1))
        self.mid_block = MidBlock(c, ch[-1], temb)
        rev, rev_heads = list(reversed(ch)), list(reversed(c.heads))
        self.up_blocks = nn.ModuleList()
        out = rev[0]
        for i, kind in enumerate(c.up_block_types):
            prev, out = out, rev[i]
            c_in = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(c, i, c_in, out, prev, temb, kind.startswith("CrossAttn"),
                                          i == len(ch) - 1, rev_heads[i]))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def _start(self, x: Tensor, timestep: Tensor, context_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """conv_in's output, the time embedding and the cross-attention bias: how every pass begins."""
        c = self.config
        bias = None
        if context_mask is not None:
            bias = ((1 - context_mask.to(x.dtype)) * -10000.0)[:, None, None, :]
        if c.center_input_sample:
            x = 2 * x - 1.0
        return self.conv_in(x), self.embed_time(timestep.to(x.device).expand(x.shape[0]), x.dtype), bias

    def embed_time(self, timestep: Tensor, dtype: torch.dtype) -> Tensor:
        """[B] training steps -> the time embedding [B, D] every resnet block is conditioned on."""
        c = self.config
        return self.time_embedding(timestep_embedding(timestep, c.block_out_channels[0], c.flip_sin_to_cos,
                                                      c.freq_shift).to(dtype))

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], timestep [B] (fractional training step), context [B, L, D], context_mask [B, L] bool."""
        h, emb, bias = self._start(x, timestep, context_mask)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, emb, context, bias)
            skips.extend(states)
        h = self.mid_block(h, emb, context, bias)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if skips else None
            h = block(h, mine, emb, context, bias, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    # the encoder half as a trunk (ARC's discriminator): stages = the down blocks, then the mid block
    @property
    def stages(self) -> int:
        return len(self.down_blocks) + (1 if getattr(self, "mid_block", None) is not None else 0)

    def stage_channels(self, depth: int) -> int:
        ch = self.config.block_out_channels
        return ch[min(depth, len(ch)) - 1]

    def truncated(self, depth: int) -> UNet2DCondition:
        """A copy with the first ``depth`` stages and nothing after them (no decoder half, no output layers)."""
        trunk = copy.deepcopy(self)
        n = len(trunk.down_blocks)
        trunk.down_blocks = nn.ModuleList(list(trunk.down_blocks)[:depth])
        if depth <= n:
            trunk.mid_block = None
        del trunk.up_blocks, trunk.conv_norm_out, trunk.conv_out
        return trunk

    def encode(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """The hidden state [B, ch, H', W'] after every stage this network has (see ``truncated``)."""
        h, emb, bias = self._start(x, timestep, context_mask)
        for block in self.down_blocks:
            h, _ = block(h, emb, context, bias)
        if getattr(self, "mid_block", None) is not None:
            h = self.mid_block(h, emb, context, bias)
        return h
