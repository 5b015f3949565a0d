"""The Stable Audio 3 diffusion transformer and its duration embedder, written from the published structure.

- time: the rectified-flow noise level t -> Fourier features at exponentially spaced frequencies (0.5 .. 10^4
  cycles per unit, cos then sin) -> MLP; plus the projected global condition (the duration embedding); one more MLP
  turns that vector into the adaLN signal (scale, shift, gate of self-attention and of the feed-forward), which each
  block adds to its own learned offset (``to_scale_shift_gate``);
- cross-attention context: T5Gemma states with every padded position replaced by a learned padding embedding, then
  the duration embedding as one more token (the reference attends to the whole context, padding included) -> MLP;
- latents -> 1x1 conv (residual) -> linear in; learned memory tokens prepended; blocks of
  RMS-normed adaLN self-attention (RMS norm on q and k per head, rotary on the first head_dim / 2 channels; Medium's
  is differential: attn(q1, k1, v) - attn(q2, k2, v)), RMS-normed cross-attention (not modulated), the inpainting
  input (keep mask + known latents, per frame) through a per-block MLP added to the frames, adaLN SwiGLU; gates are
  sigmoid(1 - g); memory tokens dropped -> linear out -> 1x1 conv (residual).

Parameter names follow diffusers' ``StableAudio3DiTModel`` (its checkpoints load as they are); Stability's own
single-file checkpoints are renamed by ``from_stability``. Padded frames of a batch are kept out of self-attention
(the references always run one length), so a sample's output does not depend on its batch companions. No Python
control flow depends on tensor values: the network traces as it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints import stable_audio_dit
from models.checkpoints.stable_audio_dit import apply_rotary, rotary_tables
from models.checkpoints.weights import CheckpointError


@dataclass
class StableAudio3DiTConfig:
    io_channels: int = 256
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 24
    cond_token_dim: int = 768  # width of the context tokens (T5Gemma states and the duration token)
    global_cond_dim: int = 768  # width of the duration embedding
    local_cond_dim: int = 257  # keep mask + latent channels of the inpainting input; 0: none
    timestep_features_dim: int = 256
    ff_mult: float = 4.0
    memory_tokens: int = 64
    differential: bool = True
    norm_eps: float = 1e-6  # the blocks' RMS norms (diffusers: 1e-6; Stability's configs name theirs)
    qk_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and names) whose float32 CPU inference on at most ``onednn_rows`` rows runs
    oneDNN's matrix product (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend emits,
    here on the weights as they are) instead of the default BLAS call. On 2 AVX2 cores of an AMD EPYC (torch 2.13)
    oneDNN is 1.1-1.6x as fast for the shapes of Stable Audio 3 Small up to 320 rows and 0.8-1.0x beyond (GFLOP/s of
    both over 64-1836 rows); a 10 s clip's DiT step (172 rows: 64 memory tokens + 108 frames) is ~1.1x faster. The
    same results to float rounding (1e-6 relative). Everywhere else (more rows, gradients, tracing for ONNX,
    torch.compile, autocast, other devices and types) it is ``F.linear``; ``onednn = False`` turns it off."""

    onednn = True
    onednn_rows = 320

    def forward(self, x: Tensor) -> Tensor:
        if (self.onednn and _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.numel() <= self.onednn_rows * x.shape[-1]
                and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu")):
            y = _ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, self.bias)


class FeedForward(stable_audio_dit.FeedForward):
    """Stable Audio's SwiGLU feed-forward, with ``Linear`` layers."""

    def __init__(self, dim: int, mult: float):
        super().__init__(dim, mult)
        for layer in (self.proj_in, self.proj_out):
            layer.__class__ = Linear  # the same module, initialised as it was; only its forward differs


def expo_frequencies(dim: int, device=None, min_freq: float = 0.5, max_freq: float = 10000.0) -> Tensor:
    """dim / 2 frequencies spaced exponentially from ``min_freq`` to ``max_freq``, float32."""
    ramp = torch.linspace(0.0, 1.0, dim // 2, device=device, dtype=torch.float32)
    return torch.exp(ramp * (math.log(max_freq) - math.log(min_freq)) + math.log(min_freq))


def expo_fourier(x: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim]: cos then sin of 2 pi x f over the ``expo_frequencies`` f, in float32."""
    args = x.float()[:, None] * expo_frequencies(dim, x.device) * (2 * math.pi)
    return torch.cat([args.cos(), args.sin()], dim=-1)


def mlp(d_in: int, d_out: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(Linear(d_in, d_out, bias=bias), nn.SiLU(), Linear(d_out, d_out, bias=bias))


class RMSNorm(nn.Module):
    """x / rms(x) * gamma, computed in float32 whatever the input type (the reference's force_fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.gamma.float()
        return y.to(x.dtype)


class DurationEmbedder(nn.Module):
    """Seconds -> the duration embedding: clamp to [min_val, max_val], normalise to [0, 1], exponential Fourier
    features (0.5 .. 10^4), linear."""

    def __init__(self, out_dim: int, fourier_dim: int = 256, min_val: float = 0.0, max_val: float = 384.0):
        super().__init__()
        self.fourier_dim, self.min_val, self.max_val = int(fourier_dim), float(min_val), float(max_val)
        self.linear = Linear(fourier_dim, out_dim)

    def forward(self, seconds: Tensor) -> Tensor:
        x = (seconds.float().clamp(self.min_val, self.max_val) - self.min_val) / (self.max_val - self.min_val)
        return self.linear(expo_fourier(x, self.fourier_dim).to(self.linear.weight.dtype))


def attention_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, H * D] -> [B, H, N, D]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class SelfAttention(nn.Module):
    """Fused projection [q1 | q2 | k1 | k2 | v] (differential) or [q | k | v]; RMS-normed q and k, partial rotary,
    padded keys masked out."""

    def __init__(self, dim: int, heads: int, differential: bool, eps: float):
        super().__init__()
        self.heads, self.differential = heads, differential
        self.to_qkv = Linear(dim, dim * (5 if differential else 3), bias=False)
        self.to_out = Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // heads, eps)
        self.k_norm = RMSNorm(dim // heads, eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor, Tensor], mask: Tensor | None) -> Tensor:
        q, k = apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor, Tensor], mask: Tensor | None) -> Tensor:
        parts = [attention_heads(p, self.heads) for p in self.to_qkv(x).chunk(5 if self.differential else 3, -1)]
        if self.differential:
            q1, q2, k1, k2, v = parts
            out = self.attend(q1, k1, v, rope, mask) - self.attend(q2, k2, v, rope, mask)
        else:
            out = self.attend(*parts, rope, mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """q: [q1 | q2] or q; kv: [k1 | k2 | v] or [k | v] from the projected context; RMS-normed q and k, no rotary,
    no mask. The keys and values depend on the context alone (``keys_values``), so a request computes them once for
    all its steps."""

    def __init__(self, dim: int, heads: int, differential: bool, eps: float):
        super().__init__()
        self.heads, self.differential = heads, differential
        self.to_q = Linear(dim, dim * (2 if differential else 1), bias=False)
        self.to_kv = Linear(dim, dim * (3 if differential else 2), bias=False)
        self.to_out = Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // heads, eps)
        self.k_norm = RMSNorm(dim // heads, eps)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The projected context's keys, RMS-normed ([B, H, L, D]; differential: k1 then k2 along the heads,
        [B, 2H, L, D]), and values [B, H, L, D]."""
        kvs = [attention_heads(p, self.heads) for p in self.to_kv(context).chunk(3 if self.differential else 2, -1)]
        if self.differential:
            return torch.cat([self.k_norm(kvs[0]), self.k_norm(kvs[1])], dim=1), kvs[2]
        return self.k_norm(kvs[0]), kvs[1]

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        queries = self.to_q(x).chunk(2 if self.differential else 1, -1)
        qs = [self.q_norm(attention_heads(q, self.heads)) for q in queries]
        if self.differential:
            h = self.heads
            out = (F.scaled_dot_product_attention(qs[0], keys[:, :h], values)
                   - F.scaled_dot_product_attention(qs[1], keys[:, h:], values))
        else:
            out = F.scaled_dot_product_attention(qs[0], keys, values)
        return self.to_out(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, c: StableAudio3DiTConfig):
        super().__init__()
        d = c.embed_dim
        self.pre_norm = RMSNorm(d, c.norm_eps)
        self.self_attn = SelfAttention(d, c.num_heads, c.differential, c.qk_norm_eps)
        self.cross_attend_norm = RMSNorm(d, c.norm_eps)
        self.cross_attn = CrossAttention(d, c.num_heads, c.differential, c.qk_norm_eps)
        self.ff_norm = RMSNorm(d, c.norm_eps)
        self.ff = FeedForward(d, c.ff_mult)
        self.to_scale_shift_gate = nn.Parameter(torch.randn(6 * d) / math.sqrt(d))
        self.to_local_embed = mlp(c.local_cond_dim, d, bias=True) if c.local_cond_dim else None

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, modulation: Tensor, rope: tuple[Tensor, Tensor, Tensor],
                mask: Tensor | None, local: Tensor | None) -> Tensor:
        """``keys`` / ``values``: the context's (``CrossAttention.keys_values``); ``local``: this block's embedding of
        the inpainting input [B, T, D] (``StableAudio3DiT.local_embeddings``), added to the frames, not the memory
        tokens."""
        adaln = (self.to_scale_shift_gate + modulation)[:, None]
        scale_a, shift_a, gate_a, scale_f, shift_f, gate_f = adaln.chunk(6, dim=-1)
        x = x + self.self_attn(self.pre_norm(x) * (1 + scale_a) + shift_a, rope, mask) * torch.sigmoid(1 - gate_a)
        x = x + self.cross_attn(self.cross_attend_norm(x), keys, values)
        if local is not None:
            x = x + F.pad(local, (0, 0, x.shape[1] - local.shape[1], 0))
        return x + self.ff(self.ff_norm(x) * (1 + scale_f) + shift_f) * torch.sigmoid(1 - gate_f)


class StableAudio3DiT(nn.Module):
    """``forward(x, t, context, context_mask, global_cond, frame_mask, local_cond)`` -> the velocity [B, C, T]."""

    def __init__(self, config: StableAudio3DiTConfig):
        super().__init__()
        c = self.config = config
        d = c.embed_dim
        if d % c.num_heads:
            raise ValueError(f"embed_dim {d} is not divisible by num_heads {c.num_heads}")
        self.to_timestep_embed = mlp(c.timestep_features_dim, d, bias=True)
        self.prompt_padding_embedding = nn.Parameter(torch.zeros(c.cond_token_dim))
        self.to_cond_embed = mlp(c.cond_token_dim, d, bias=False)
        self.to_global_embed = mlp(c.global_cond_dim, d, bias=False)
        self.global_cond_embedder = nn.Sequential(Linear(d, d), nn.SiLU(), Linear(d, 6 * d))
        self.preprocess_conv = nn.Conv1d(c.io_channels, c.io_channels, 1, bias=False)
        self.postprocess_conv = nn.Conv1d(c.io_channels, c.io_channels, 1, bias=False)
        self.proj_in = Linear(c.io_channels, d, bias=False)
        self.proj_out = Linear(d, c.io_channels, bias=False)
        self.memory_tokens = nn.Parameter(torch.randn(c.memory_tokens, d) * 0.02)
        self.transformer_blocks = nn.ModuleList(Block(c) for _ in range(c.depth))

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None, global_cond: Tensor,
                frame_mask: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        """x [B, C, T]; t [B] (the model's time: the noise level); context [B, L, cond_token_dim] with context_mask
        [B, L] (True: a real token; the others become the padding embedding); global_cond [B, global_cond_dim];
        frame_mask [B, T] (True: a real frame); local_cond [B, local_cond_dim, T] (a row that is all zero gets no
        local conditioning, as a request without one). ``request_state`` then ``run``: the same computation."""
        keys, values, global_embed = self.request_state(context, context_mask, global_cond)
        local = None if local_cond is None else self.local_embeddings(local_cond, x.dtype)
        return self.run(x, t, keys, values, global_embed, frame_mask, local)

    def request_state(self, context: Tensor, context_mask: Tensor | None,
                      global_cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What depends on the conditioning alone, which a request computes once for all its steps: every block's
        cross-attention keys [depth, B, H (2H differential), L, D] and values [depth, B, H, L, D], and the global
        condition's embedding [B, embed_dim] (the time embedding is added to it per step)."""
        if context_mask is not None:
            pad = self.prompt_padding_embedding.to(context.dtype)
            context = torch.where(context_mask[..., None].bool(), context, pad)
        context = self.to_cond_embed(context)
        kv = [block.cross_attn.keys_values(context) for block in self.transformer_blocks]
        return (torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]),
                self.to_global_embed(global_cond))

    def local_embeddings(self, local_cond: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Every block's embedding of the inpainting input [depth, B, T, embed_dim] (zero for a row that is all
        zero), or None for a DiT without that input. It depends on the request alone, like ``request_state``."""
        if self.config.local_cond_dim == 0:
            return None
        local = local_cond.to(dtype).transpose(1, 2)
        gate = (local_cond.abs().amax(dim=(1, 2)) > 0)[:, None, None]
        return torch.stack([(embed := block.to_local_embed(local)) * gate.to(embed.dtype)
                            for block in self.transformer_blocks])

    def run(self, x: Tensor, t: Tensor, keys: Tensor, values: Tensor, global_embed: Tensor,
            frame_mask: Tensor | None = None, local: Tensor | None = None) -> Tensor:
        """The per-step part of ``forward``, from ``request_state``'s outputs and ``local_embeddings``' (or None)."""
        c = self.config
        b, _, length = x.shape
        time = self.to_timestep_embed(expo_fourier(t, c.timestep_features_dim).to(x.dtype))
        modulation = self.global_cond_embedder(global_embed + time)
        h = self.proj_in((self.preprocess_conv(x) + x).transpose(1, 2))
        h = torch.cat([self.memory_tokens.to(h.dtype).expand(b, -1, -1), h], dim=1)
        rope = rotary_tables(c.memory_tokens + length, c.head_dim // 2, x.device, c.head_dim)
        mask = None
        if frame_mask is not None:
            keep = F.pad(frame_mask.bool(), (c.memory_tokens, 0), value=True)
            mask = keep[:, None, None, :]
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, keys[i], values[i], modulation, rope, mask, None if local is None else local[i])
        out = self.proj_out(h[:, c.memory_tokens:]).transpose(1, 2)
        out = self.postprocess_conv(out) + out
        if frame_mask is not None:
            out = out * frame_mask[:, None].to(out.dtype)
        return out


# ---------------------------------------------------------------------------------------------- published layouts
def inverse_frequencies(dim: int) -> Tensor:
    """The base-10000 rotary frequencies of ``dim`` rotated channels, as the references store them."""
    return 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def check_frequency_table(table: Tensor, dim: int, source: str, key: str) -> None:
    """A checkpoint's stored rotary table must be the standard one this module computes."""
    expected = inverse_frequencies(dim)
    same = table.shape == expected.shape and (table.is_meta or torch.allclose(table.float().cpu(), expected, rtol=1e-4))
    if not same:
        raise CheckpointError(f"{source}: {key} of shape {tuple(table.shape)} differs from the standard base-10000 "
                              f"rotary table of {dim} channels this loader implements")


def from_diffusers(state: dict[str, Tensor], config: StableAudio3DiTConfig, source: str) -> dict[str, Tensor]:
    """diffusers ``StableAudio3DiTModel`` weights -> ours: the same names, less the stored rotary table."""
    out = dict(state)
    table = out.pop("rotary_pos_emb.inv_freq", None)
    if table is not None:
        check_frequency_table(table, config.head_dim // 2, source, "rotary_pos_emb.inv_freq")
    return out


def reorder_qkv(weight: Tensor, to_stability: bool = False) -> Tensor:
    """A differential fused projection: Stability's [q1 | k1 | v | q2 | k2] rows <-> ours [q1 | q2 | k1 | k2 | v]."""
    q1, b, c, d, e = weight.chunk(5, dim=0)
    return torch.cat([q1, c, e, b, d] if to_stability else [q1, d, b, e, c])


STABILITY_BLOCK_RENAMES = (("ff.ff.0.proj.", "ff.proj_in."), ("ff.ff.2.", "ff.proj_out."))
STABILITY_TOP = {"transformer.project_in.": "proj_in.", "transformer.project_out.": "proj_out.",
                 "transformer.memory_tokens": "memory_tokens",
                 "transformer.global_cond_embedder.": "global_cond_embedder."}


def from_stability(state: dict[str, Tensor], config: StableAudio3DiTConfig, source: str,
                   origin: dict[str, str]) -> dict[str, Tensor]:
    """The DiT's part of a Stability single-file checkpoint (keys after ``model.model.``) -> ours; ``origin`` is
    filled with our key -> the file's key (for error messages). Unknown keys are kept for the strict fit to name."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        if key == "transformer.rotary_pos_emb.inv_freq":
            check_frequency_table(value, config.head_dim // 2, source, "model.model." + key)
            continue
        if key.startswith("transformer.layers."):
            index, _, rest = key[len("transformer.layers."):].partition(".")
            for old, renamed in STABILITY_BLOCK_RENAMES:
                rest = rest.replace(old, renamed, 1)
            new = f"transformer_blocks.{index}.{rest}"
            if rest == "self_attn.to_qkv.weight" and config.differential:
                value = reorder_qkv(value)
        else:
            for old, renamed in STABILITY_TOP.items():
                if key.startswith(old):
                    new = renamed + key[len(old):]
                    break
        out[new] = value
        origin[new] = "model.model." + key
    return out


def to_stability(state: dict[str, Tensor], config: StableAudio3DiTConfig) -> dict[str, Tensor]:
    """Ours -> the DiT's keys in a Stability checkpoint (after ``model.model.``; the inverse of ``from_stability``,
    with the rotary table the reference stores; the padding embedding lives on its prompt conditioner, apart)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "prompt_padding_embedding":
            continue
        if key.startswith("transformer_blocks."):
            index, _, rest = key[len("transformer_blocks."):].partition(".")
            for old, renamed in STABILITY_BLOCK_RENAMES:
                rest = rest.replace(renamed, old, 1)
            if rest == "self_attn.to_qkv.weight" and config.differential:
                value = reorder_qkv(value, to_stability=True)
            key = f"transformer.layers.{index}.{rest}"
        else:
            key = next((old + key[len(new):] for old, new in STABILITY_TOP.items() if key.startswith(new)), key)
        out[key] = value
    out["transformer.rotary_pos_emb.inv_freq"] = inverse_frequencies(config.head_dim // 2)
    return out


def config_from_diffusers(cfg: dict, source: str) -> StableAudio3DiTConfig:
    """Ours from a diffusers ``StableAudio3DiTModel`` config.json (transformer/config.json)."""
    if int(cfg.get("patch_size", 1)) != 1:
        raise CheckpointError(f"{source}: patch_size {cfg.get('patch_size')} is not supported (only 1)")
    return StableAudio3DiTConfig(
        io_channels=int(cfg.get("io_channels", 256)), embed_dim=int(cfg.get("embed_dim", 1536)),
        depth=int(cfg.get("depth", 24)), num_heads=int(cfg.get("num_heads", 24)),
        cond_token_dim=int(cfg.get("cond_token_dim", 768)), global_cond_dim=int(cfg.get("global_cond_dim", 768)),
        local_cond_dim=int(cfg.get("local_add_cond_dim", 257)),
        timestep_features_dim=int(cfg.get("timestep_features_dim", 256)), ff_mult=float(cfg.get("ff_mult", 4.0)),
        memory_tokens=int(cfg.get("num_memory_tokens", 64)),
        differential=bool(cfg.get("use_differential_attention", True)))


def diffusers_config(c: StableAudio3DiTConfig) -> dict:
    """The diffusers config.json of this network (the inverse of ``config_from_diffusers``)."""
    return {"_class_name": "StableAudio3DiTModel", "io_channels": c.io_channels, "patch_size": 1,
            "embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads, "cond_token_dim": c.cond_token_dim,
            "global_cond_dim": c.global_cond_dim, "local_add_cond_dim": c.local_cond_dim,
            "timestep_features_dim": c.timestep_features_dim, "ff_mult": c.ff_mult,
            "num_memory_tokens": c.memory_tokens, "use_differential_attention": c.differential}


def to_diffusers(state: dict[str, Tensor], config: StableAudio3DiTConfig) -> dict[str, Tensor]:
    """Ours -> diffusers' state dict: the same names plus the rotary table it stores."""
    return {**state, "rotary_pos_emb.inv_freq": inverse_frequencies(config.head_dim // 2)}


def duration_from_diffusers(state: dict[str, Tensor], fourier_dim: int, source: str) -> dict[str, Tensor]:
    """diffusers ``StableAudio3DurationEmbedder`` weights -> ours: less its stored frequency table, which must be
    the one ``expo_frequencies`` computes."""
    out = dict(state)
    table = out.pop("freqs", None)
    expected = expo_frequencies(fourier_dim)
    if table is not None and not (table.shape == expected.shape and (
            table.is_meta or torch.allclose(table.float(), expected, rtol=1e-5))):
        raise CheckpointError(f"{source}: freqs differ from the exponential table (0.5 .. 10^4 over "
                              f"{fourier_dim // 2} frequencies) this loader implements")
    return out
