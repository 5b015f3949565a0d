"""The DiT denoiser: a transformer over latent frames.

Conditioning, as in Stable Audio: cross-attention to the text encoder's token states; a global condition
(pooled text embedding + requested duration in seconds, like seconds_total) added to the timestep embedding and
applied through adaptive LayerNorm (adaLN-Zero, as in DiT); rotary position embeddings so any length up to the
model maximum works. Padded frames (batches of different durations) are masked out of self-attention and zeroed,
so a sample's output does not depend on what else shares its batch. An optional guidance-scale embedding lets a
distilled student take the guidance scale as an input (guided distillation, stage one). An optional rhythm
conditioner (``RhythmConditioner``) adds beat-phase features of the tempi a prompt states to the latent frames, and
an optional value conditioner (``ValueConditioner``) the log of every stated value, such as a pitch in Hz. With
``values_only`` (not in a shipped model) that is the only way a stated value gets in: cross-attention and the
pooled condition see where the numbers are, not their values.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import drop_retired_keys
from models.layers import fourier_features
from models.text.encoders import LOG_VALUE_CHANNEL, PRESENT_CHANNEL, NumberChannels, number_value


# DiTConfig keys of options that were measured and removed: a config that still has one loads without it
RETIRED_DIT_KEYS = ("value_head_slots",)


@dataclass
class DiTConfig:
    latent_dim: int = 33  # the embedded codec: 4 pitch + 1 balance + 28 learned channels
    width: int = 192
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 3.0
    text_dim: int = 384
    pooled_dim: int = 384
    max_seconds: float = 10.0
    guidance_embed: bool = False
    # latent frames per second for the rhythm conditioner (0 = none); it needs the text encoder's linear number
    # channels (number_linear) as the last two token channels
    rhythm_frame_rate: float = 0.0
    rhythm_multiples: tuple[float, ...] = (1.0, 2.0, 3.0)
    # the log of each stated number added to every frame (ValueConditioner); needs number_linear too
    number_values: bool = False
    # the text encoder's number channels at the end of each token state and of the pooled embedding
    # (models.text.encoders.number_features; 0 = unknown), and whether cross-attention and the global condition see
    # them with their values hidden (the presence flag kept), so that a stated value reaches the denoiser through the
    # value and rhythm conditioners alone: read through cross-attention, its gain rides on the number's share of
    # attention, which moves with the words around it. Warm started from the embedded teacher, a values_only
    # denoiser had not learned to read pitch again after 2300 steps, so this is for training from scratch or a
    # longer run
    number_width: int = 0
    values_only: bool = False

    def __post_init__(self) -> None:
        if self.values_only and not (self.number_values and self.number_width >= 2):
            raise ValueError("values_only hides the number values from cross-attention: it needs the value conditioner "
                             "(number_values) and the width of the text encoder's number channels (number_width)")

    @property
    def number_readers(self) -> list[str]:
        """The conditioners this denoiser has that read the text encoder's linear number channels."""
        return [name for name, on in (("rhythm", self.rhythm_frame_rate > 0), ("values", self.number_values)) if on]

    def check_numbers(self, numbers: NumberChannels, where: str = "") -> None:
        """Raise unless the text encoder's number channels (``numbers``) include the linear ones that a conditioner
        of this denoiser reads, and are as many as ``values_only`` hides; ``where`` prefixes the message (a model
        directory, a training config)."""
        if self.number_readers and not numbers.linear:
            raise ValueError(f"{where}the denoiser's {' and '.join(self.number_readers)} conditioner reads the text "
                             "encoder's linear number channels, but number_linear is not set")
        if self.values_only and self.number_width != numbers.width:
            raise ValueError(f"{where}the denoiser hides the values of {self.number_width} number channels, but the "
                             f"text encoder writes {numbers.width}")


def number_value_mask(dim: int, number_width: int) -> Tensor:
    """[dim] ones, zero on the value channels of the ``number_width`` trailing number channels (all but the presence
    flag, the last-but-one): a token state or pooled embedding times it keeps where numbers are, not what they are."""
    keep = torch.ones(dim)
    keep[dim - number_width:] = 0.0
    keep[PRESENT_CHANNEL] = 1.0
    return keep


def linear_number_channels(tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """tokens [B, L, D] whose last two channels are the text encoder's linear number channels
    (``models.text.encoders.number_features``) -> (presence [B, L]: 1 on an unmasked token of a number, else 0;
    the normalised log value [B, L], meaningful where present)."""
    return tokens[..., PRESENT_CHANNEL] * token_mask.to(tokens.dtype), tokens[..., LOG_VALUE_CHANNEL]


def number_weights(tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """tokens [B, L, D] with the linear number channels last -> (weight [B, L], log value [B, L]): the subword tokens
    of one number carry the same value and share a unit weight, so "1141" counts once however the tokenizer splits
    it; tokens of no number weigh (and read) zero."""
    present, log_value = linear_number_channels(tokens, token_mask)
    log_value = log_value * present
    same = ((log_value[:, :, None] - log_value[:, None, :]).abs() < 1e-6).to(tokens.dtype)
    share = (same * present[:, None, :]).sum(-1).clamp(min=1.0)
    return present / share, log_value


def rope_tables(length: int, head_dim: int, device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary tables for ``apply_rope``: cos and sin of each channel pair's angle at each position, repeated over
    the pair's two channels: [T, head_dim] each."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv.repeat_interleave(2)[None]
    return torch.cos(angles), torch.sin(angles)


def pair_swap(head_dim: int) -> Tensor:
    """[head_dim, head_dim] with x @ swap = (-x1, x0, -x3, x2, ...)."""
    swap = torch.zeros(head_dim, head_dim)
    even = torch.arange(0, head_dim, 2)
    swap[even + 1, even] = -1.0
    swap[even, even + 1] = 1.0
    return swap


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, swap: Tensor) -> Tensor:
    """x [B, H, T, D]: rotate pairs (even, odd) of channels by position-dependent angles:
    (x0 cos - x1 sin, x0 sin + x1 cos). The swap is a matrix product with one +-1 per column, exact in floating
    point, so this equals the strided-slice form bit for bit and exports as MatMul / Mul / Add (ONNX Runtime runs
    strided Slice, Stack and Flatten far slower)."""
    return x * cos + (x @ swap) * sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim or width, 2 * width)
        self.out = nn.Linear(width, width)
        self.q_norm = nn.LayerNorm(width // heads)
        self.k_norm = nn.LayerNorm(width // heads)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor,
                rope: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        b, t, w = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(b, t, w))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.norm_x = nn.LayerNorm(width)
        self.cross = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, cond, context, context_mask, frame_mask, rope):
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(cond))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + c1) + s1
        x = x + g1 * self.attn(h, h, frame_mask, rope)
        x = x + self.cross(self.norm_x(x), context, context_mask)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + c2) + s2)
        return x


class RhythmConditioner(nn.Module):
    """Beat-phase features of every number in the prompt, read as a rate per minute, mixed into the latent frames.

    Why: a click train at B BPM repeats every 60 / B s (1292 / B latent frames); self-attention with rotary
    positions sees fixed frequencies and has to build that period out of the text, which a small model trained on
    CPU did not learn (tempo right in 1 to 3 of 16 clips whatever the pitch and placement training did). Here every
    number token n of value v contributes sin / cos(2 pi k (v / 60) s) at each frame's time s for the multiples k,
    mixed to the model width by a matrix read from that token's contextual state: the state knows whether "BPM" or
    "Hz" follows, so the model learns to pass tempi and drop pitches and durations. Frames at the same beat phase
    then carry equal features, which self-attention can match to repeat a click a period later, at any tempo,
    seen in training or not. The mixing starts at zero, so a warm-started model computes what it did before."""

    def __init__(self, width: int, frame_rate: float, multiples: tuple[float, ...]):
        super().__init__()
        self.frame_rate = float(frame_rate)
        self.register_buffer("multiples", torch.tensor([float(k) for k in multiples]), persistent=False)
        self.mix = nn.Linear(width, 2 * len(multiples) * width)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, tokens: Tensor, token_mask: Tensor, context: Tensor, length: int) -> Tensor:
        """tokens [B, L, D] (last two channels: a number is here, its normalised log value), token_mask [B, L],
        context [B, L, width] (the projected token states) -> [B, length, width]."""
        b, n, w = context.shape
        present, log_value = linear_number_channels(tokens, token_mask)
        per_second = number_value(log_value) / 60.0
        seconds = torch.arange(length, device=tokens.device, dtype=torch.float32) / self.frame_rate
        angle = (2 * torch.pi) * per_second[:, :, None, None] * seconds[None, None, :, None] * self.multiples
        phase = torch.cat([torch.sin(angle), torch.cos(angle)], -1) * present[:, :, None, None]  # [B, L, T, 2K]
        mix = self.mix(context).view(b, n, -1, w)  # [B, L, 2K, width]
        return torch.einsum("bltk,blkw->btw", phase.to(context.dtype), mix)


class ValueConditioner(nn.Module):
    """The log of every number in the prompt, added to every latent frame along a direction read from its token.

    Why: the embedded codec's pitch channel is 10 ln(f / 400 Hz) for a tone, linear in the log of the stated
    pitch, and the text encoder's linear number channel holds exactly that log. Read through cross-attention, a
    token's value arrives scaled by its attention weight, which moves with the phrasing of the caption, and
    held-out pitch errors without this conditioner looked like a gain that is off (+-10 to 25 % at 100 and 1600 Hz,
    under 1 % near 400 Hz). Here each number contributes ``log_value * a + b`` with unit weight, where (a, b) are
    read by a matrix from the number's contextual state (which knows whether "Hz", "BPM" or "seconds" follows, so
    the model learns which values to pass and where to); the subword tokens of one number share its weight, so
    "1141" counts once however the tokenizer splits it. The mixing starts at zero, so a warm-started model computes
    what it did before. Measured on the embedded teacher: tempo improved, pitch did not, because the model still
    read the value from the number's unordered subword states as well (``models.text.encoders.number_spans`` masks
    them) and guidance moves each caption's median (``benchmarks/pitch_reading.py``)."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, tokens: Tensor, token_mask: Tensor, context: Tensor) -> Tensor:
        """tokens [B, L, D] (last two channels: a number is here, its normalised log value), token_mask [B, L],
        context [B, L, width] -> [B, 1, width], to be added to every frame."""
        b, n, w = context.shape
        weight, log_value = number_weights(tokens, token_mask)
        a, c = self.mix(context).view(b, n, 2, w).unbind(2)  # [B, L, width] each
        out = (weight * log_value)[:, :, None].to(context.dtype) * a + weight[:, :, None].to(context.dtype) * c
        return out.sum(1, keepdim=True)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        c = self.config = config or DiTConfig()
        w = c.width
        self.proj_in = nn.Linear(c.latent_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.seconds_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.pooled_proj = nn.Sequential(nn.Linear(c.pooled_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.guidance_mlp = (nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
                             if c.guidance_embed else None)
        self.context_proj = nn.Sequential(nn.Linear(c.text_dim, w), nn.LayerNorm(w))
        self.rhythm = (RhythmConditioner(w, c.rhythm_frame_rate, c.rhythm_multiples)
                       if c.rhythm_frame_rate > 0 else None)
        self.values = ValueConditioner(w) if c.number_values else None
        if c.values_only:
            self.register_buffer("token_keep", number_value_mask(c.text_dim, c.number_width), persistent=False)
            self.register_buffer("pooled_keep", number_value_mask(c.pooled_dim, c.number_width), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(w, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.register_buffer("rope_swap", pair_swap(w // c.heads), persistent=False)
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False)
        self.ada_out = nn.Linear(w, 2 * w)
        self.proj_out = nn.Linear(w, c.latent_dim)
        for layer in (self.ada_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.guidance_mlp is not None:
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)

    def condition(self, t: Tensor, pooled: Tensor, seconds: Tensor, guidance: Tensor | None) -> Tensor:
        c = self.config
        cond = self.time_mlp(fourier_features(t * 1000.0, 256))
        cond = cond + self.seconds_mlp(fourier_features(seconds / c.max_seconds * 1000.0, 256))
        cond = cond + self.pooled_proj(pooled)
        if self.guidance_mlp is not None:
            if guidance is None:
                raise ValueError("this denoiser was trained with a guidance-scale input; pass guidance")
            cond = cond + self.guidance_mlp(fourier_features(guidance * 100.0, 256))
        return cond

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.config.width

    def trunk(self, depth: int) -> DiT:
        """A copy with the first ``depth`` blocks and no output layers: its ``features`` (ARC's discriminator)."""
        trunk = copy.deepcopy(self)
        trunk.blocks = nn.ModuleList(list(trunk.blocks)[:depth])
        del trunk.norm_out, trunk.ada_out, trunk.proj_out
        return trunk

    def token_context(self, tokens: Tensor) -> Tensor:
        """The token states [B, L, text_dim] projected to the width, as cross-attention and the conditioners read
        them (their values hidden with ``values_only``)."""
        return self.context_proj(tokens * self.token_keep if self.config.values_only else tokens)

    def features(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                 frame_mask: Tensor, guidance: Tensor | None = None,
                 context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The transformer trunk: hidden states [B, T, width] after every block in ``self.blocks`` (padded frames
        carry garbage that never reaches a real frame) and the global condition [B, width]. ``context``: the
        ``token_context`` of ``tokens`` where the caller has it."""
        keep = frame_mask[:, :, None].to(z.dtype)
        x = self.proj_in(z.transpose(1, 2)) * keep
        if self.config.values_only:
            pooled = pooled * self.pooled_keep
        cond = self.condition(t.to(z.dtype), pooled, seconds.to(z.dtype), guidance)
        context = self.token_context(tokens) if context is None else context
        if self.rhythm is not None:
            x = x + self.rhythm(tokens, token_mask, context, z.shape[-1]) * keep
        if self.values is not None:
            x = x + self.values(tokens, token_mask, context) * keep
        rope = (*rope_tables(z.shape[-1], self.config.width // self.config.heads, z.device), self.rope_swap)
        for block in self.blocks:
            x = block(x, cond, context, token_mask, frame_mask, rope)
        return x, cond

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """z [B, C, T], t [B] in [0, 1], tokens [B, L, text_dim], token_mask [B, L] bool, pooled [B, pooled_dim],
        seconds [B], frame_mask [B, T] bool (True = real frame) -> raw prediction [B, C, T]."""
        b, _, length = z.shape
        if frame_mask is None:
            frame_mask = torch.ones(b, length, dtype=torch.bool, device=z.device)
        keep = frame_mask[:, :, None].to(z.dtype)
        context = self.token_context(tokens)
        x, cond = self.features(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance, context)
        shift, scale = self.ada_out(F.silu(cond))[:, None].chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale) + shift
        return (self.proj_out(x) * keep).transpose(1, 2)

    def to_config(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> DiT:
        """The denoiser of a saved config (``to_config``); retired keys are dropped with a warning."""
        config = drop_retired_keys(config, RETIRED_DIT_KEYS, "denoiser config")
        if "rhythm_multiples" in config:
            config["rhythm_multiples"] = tuple(config["rhythm_multiples"])
        return cls(DiTConfig(**config))
