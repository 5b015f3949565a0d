"""The Stable Audio diffusion transformer (Stable Audio Open 1.0 and Small), written from its published structure.

One network serves both public layouts of these models: stable-audio-tools' ``DiffusionTransformer`` with its
``ContinuousTransformer`` (parameter names kept, so its checkpoints load by prefix) and diffusers'
``StableAudioDiTModel`` (renamed on load, see ``diffusers_key``). The structure:

- time t -> learned Fourier features (cos, sin) -> MLP; added to the projected global condition (the duration
  embedding) and prepended to the sequence as one token;
- latents -> 1x1 "preprocess" conv (residual) -> linear in; a stack of pre-LayerNorm blocks, each self-attention
  (optional LayerNorm on q and k per head, rotary embedding on the first ``rotary_dim`` channels of every head),
  cross-attention to the projected conditioning tokens (fewer key/value heads when the context is narrower), and a
  SwiGLU feed-forward; -> linear out -> 1x1 "postprocess" conv (residual); the prepended token is dropped.

Padded frames of a batch are masked out of self-attention (the reference has no padding: it always runs full
length), so each sample's output is the same as when it runs alone.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.weights import CheckpointError
from models.conditioning import AllFramesReal


@dataclass
class StableAudioDiTConfig:
    io_channels: int = 64
    embed_dim: int = 1024
    depth: int = 16
    num_heads: int = 8
    cond_token_dim: int = 768  # width of the conditioning tokens; 0: no cross-attention
    project_cond_tokens: bool = True  # project them to embed_dim (else keep their width, or context_dim if set)
    context_dim: int = 0  # width of the projected tokens when not embed_dim (diffusers' cross_attention_dim)
    global_cond_dim: int = 768  # 0: no global condition (the time token alone is prepended)
    project_global_cond: bool = True
    qk_norm: str = "none"  # "ln" | "none"
    ff_mult: float = 4.0
    rotary_dim: int = 0  # 0: stable-audio-tools' default max(head_dim // 2, 32)
    timestep_features_dim: int = 256
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def cond_embed_dim(self) -> int:
        if self.project_cond_tokens:
            return self.embed_dim
        return self.context_dim or self.cond_token_dim

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or max(self.head_dim // 2, 32)


# stable-audio-tools DiffusionTransformer / ContinuousTransformer options this implementation covers, with the value
# that must hold (anything else is refused with a clear error instead of being silently ignored).
SAT_FIXED_OPTIONS = {
    "patch_size": 1, "input_concat_dim": 0, "prepend_cond_dim": 0, "transformer_type": "continuous_transformer",
    "global_cond_type": "prepend", "timestep_cond_type": "global", "timestep_features_type": "learned",
    "timestep_features_logsnr": False, "conformer": False, "layer_scale": False, "remove_norms": False,
    "use_sinusoidal_emb": False, "use_abs_pos_emb": False, "num_memory_tokens": 0, "causal": False,
    "rotary_pos_emb": True, "final_cross_attn_ix": -1, "sliding_window": None, "add_rope": False,
    "modular_local_cond_configs": None,
}


def config_from_stable_audio_tools(cfg: dict, source: str) -> StableAudioDiTConfig:
    """Our config from the ``model.diffusion.config`` block of a stable-audio-tools model_config.json."""
    cfg = dict(cfg)
    for key, value in SAT_FIXED_OPTIONS.items():
        if key in cfg and cfg[key] != value:
            raise CheckpointError(f"{source}: DiT option {key}={cfg[key]!r} is not supported (only {value!r})")
    attn = dict(cfg.get("attn_kwargs") or {})
    qk_norm = attn.pop("qk_norm", "none")
    if qk_norm not in ("ln", "none"):
        raise CheckpointError(f"{source}: attn_kwargs.qk_norm={qk_norm!r} is not supported (only 'ln' or 'none')")
    attn = {k: v for k, v in attn.items() if v not in (False, None, 0)}
    if attn:
        raise CheckpointError(f"{source}: attn_kwargs {sorted(attn)} are not supported")
    ff = dict(cfg.get("ff_kwargs") or {})
    mult = float(ff.pop("mult", 4))
    ff_defaults = {"no_bias": False, "glu": True, "use_conv": False, "zero_init_output": True}
    odd = {k: v for k, v in ff.items() if ff_defaults.get(k, object()) != v and k != "zero_init_output"}
    if odd:
        raise CheckpointError(f"{source}: ff_kwargs {sorted(odd)} are not supported")
    norm = dict(cfg.get("norm_kwargs") or {})
    eps = float(norm.pop("eps", 1e-5))
    norm.pop("force_fp32", None)
    if norm.get("bias") or norm.get("fix_scale"):
        raise CheckpointError(f"{source}: norm_kwargs {sorted(norm)} are not supported")
    if cfg.get("diffusion_objective", "v") not in ("v", "rectified_flow", "rf_denoiser"):
        raise CheckpointError(f"{source}: unknown diffusion_objective {cfg.get('diffusion_objective')!r}")
    return StableAudioDiTConfig(
        io_channels=int(cfg.get("io_channels", 32)), embed_dim=int(cfg.get("embed_dim", 768)),
        depth=int(cfg.get("depth", 12)), num_heads=int(cfg.get("num_heads", 8)),
        cond_token_dim=int(cfg.get("cond_token_dim", 0)), project_cond_tokens=bool(cfg.get("project_cond_tokens", True)),
        global_cond_dim=int(cfg.get("global_cond_dim", 0)),
        project_global_cond=bool(cfg.get("project_global_cond", True)), qk_norm=qk_norm, ff_mult=mult,
        rotary_dim=0, timestep_features_dim=int(cfg.get("timestep_features_dim", 256)), norm_eps=eps)


def config_from_diffusers(cfg: dict, source: str) -> StableAudioDiTConfig:
    """Our config from a diffusers ``StableAudioDiTModel`` config.json (transformer/config.json)."""
    heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 64))
    if int(cfg.get("in_channels", 64)) != int(cfg.get("out_channels", 64)):
        raise CheckpointError(f"{source}: in_channels != out_channels is not supported")
    cross_dim = int(cfg.get("cross_attention_dim", 768))
    kv_heads = int(cfg.get("num_key_value_attention_heads", heads))
    if cross_dim != kv_heads * head_dim:
        raise CheckpointError(f"{source}: cross_attention_dim {cross_dim} != num_key_value_attention_heads x "
                              f"attention_head_dim ({kv_heads} x {head_dim})")
    return StableAudioDiTConfig(
        io_channels=int(cfg.get("in_channels", 64)), embed_dim=heads * head_dim,
        depth=int(cfg.get("num_layers", 24)), num_heads=heads,
        cond_token_dim=int(cfg.get("cross_attention_input_dim", 768)),
        project_cond_tokens=False, context_dim=cross_dim, global_cond_dim=int(cfg.get("global_states_input_dim", 1536)),
        project_global_cond=True, qk_norm="none", ff_mult=4.0, rotary_dim=head_dim // 2,
        timestep_features_dim=int(cfg.get("time_proj_dim", 256)), norm_eps=1e-5)


def rotary_tables(length: int, dim: int, device, width: int, base: float = 10000.0) -> tuple[Tensor, Tensor, Tensor]:
    """The tables ``apply_rotary`` reads for heads of ``width`` channels whose first ``dim`` rotate, in the
    half-split ("rotate half") layout used by both references: cos' and sin' [length, width] and the channel order
    ``swap`` [width]. Serving (inference mode) reads them from a cache per length rather than computing them at
    every forward; with gradients, or while a graph is traced or compiled, they are computed (a kept table must not
    become a graph's constant)."""
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()) and torch.is_inference_mode_enabled():
        return _cached_rotary_tables(length, dim, torch.device(device), width, base)
    return _rotary_tables(length, dim, device, width, base)


@functools.lru_cache(maxsize=64)
def _cached_rotary_tables(length: int, dim: int, device: torch.device, width: int,
                          base: float) -> tuple[Tensor, Tensor, Tensor]:
    return _rotary_tables(length, dim, device, width, base)


def _rotary_tables(length: int, dim: int, device, width: int, base: float) -> tuple[Tensor, Tensor, Tensor]:
    """The references' cos / sin [length, dim] of the angles, widened to the head: cos' is 1 and sin' 0 on the
    ``width - dim`` channels that pass through, and sin' is negated on the rotated part's first half; ``swap``
    exchanges the two halves of the rotated part and keeps the rest in place."""
    if not 0 < dim <= width or dim % 2:
        raise ValueError(f"rotary dim {dim} must be even and within the head's {width} channels")
    inv = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = freqs.cos(), freqs.sin()
    rest = width - dim
    cos = torch.cat([cos, cos, cos.new_ones(length, rest)], dim=-1)
    sin = torch.cat([-sin, sin, sin.new_zeros(length, rest)], dim=-1)
    half = dim // 2
    swap = torch.cat([torch.arange(half, dim), torch.arange(half), torch.arange(dim, width)]).to(device)
    return cos, sin, swap


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, swap: Tensor) -> Tensor:
    """Rotate the first channels of x [B, H, N, D] with ``rotary_tables``' (cos', sin', swap); the rest pass through.
    x * cos' + x[..., swap] * sin', in float32: the references' x1 cos - x2 sin and x2 cos + x1 sin on the rotated
    halves, and x * 1 + x' * 0 elsewhere, each product and sum the same floating-point operation as theirs (so the
    same result bit for bit), in four kernels where slicing, negating and concatenating took six."""
    xf = x.float()
    return (xf * cos + xf.index_select(-1, swap) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention without biases; self-attention uses one fused qkv projection, cross-attention separate q
    and kv projections with kv heads = context width / head dim (grouped-query when narrower)."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.cross = context_dim is not None
        if self.cross:
            self.kv_heads = context_dim // head_dim
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * context_dim, bias=False)
        else:
            self.kv_heads = self.heads
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        if qk_norm:
            self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
            self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, context_kv: Tensor | None = None, rope: tuple[Tensor, Tensor, Tensor] | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """Self-attention over ``x``, or cross-attention to the keys and values ``to_kv(context)`` (``context_kv``:
        they depend on the request alone, so the caller may keep them across steps)."""
        b, n, _ = x.shape
        if self.cross:
            q = self.to_q(x)
            k, v = context_kv.chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = (y.view(b, y.shape[1], self.kv_heads, self.head_dim).transpose(1, 2) for y in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """SwiGLU: (a, gate) = proj_in(x); proj_out(a * silu(gate))."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.silu(gate))


class Block(nn.Module):
    def __init__(self, c: StableAudioDiTConfig):
        super().__init__()
        d = c.embed_dim
        self.pre_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.self_attn = Attention(d, c.head_dim, None, c.qk_norm == "ln")
        self.cross_attend = c.cond_token_dim > 0
        if self.cross_attend:
            self.cross_attend_norm = nn.LayerNorm(d, eps=c.norm_eps)
            self.cross_attn = Attention(d, c.head_dim, c.cond_embed_dim, c.qk_norm == "ln")
        self.ff_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.ff = FeedForward(d, c.ff_mult)

    def forward(self, x, context_kv, rope, key_mask):
        x = x + self.self_attn(self.pre_norm(x), rope=rope, key_mask=key_mask)
        if self.cross_attend and context_kv is not None:
            x = x + self.cross_attn(self.cross_attend_norm(x), context_kv)
        return x + self.ff(self.ff_norm(x))


def _mlp(d_in: int, d_out: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.SiLU(), nn.Linear(d_out, d_out, bias=bias))


class StableAudioDiT(nn.Module):
    """The network; ``forward`` takes the model's own time input (rectified-flow t, or the cosine-schedule t of
    v-objective models) — the denoiser adapter converts the project's time to it."""

    def __init__(self, config: StableAudioDiTConfig):
        super().__init__()
        c = self.config = config
        d = c.embed_dim
        if c.embed_dim % c.num_heads:
            raise ValueError(f"embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}")
        self.timestep_features = nn.Parameter(torch.randn(c.timestep_features_dim // 2, 1))
        self.all_frames_real = AllFramesReal()
        # True: every forward takes the masked attention path, as traced and captured forwards do (set when the
        # blocks are compiled apart, so that their warm-ups compile the form their captures replay)
        self.masks_always = False
        self.to_timestep_embed = _mlp(c.timestep_features_dim, d, bias=True)
        if c.cond_token_dim > 0:
            self.to_cond_embed = _mlp(c.cond_token_dim, c.cond_embed_dim, bias=False)
        if c.global_cond_dim > 0:
            self.to_global_embed = _mlp(c.global_cond_dim, d if c.project_global_cond else c.global_cond_dim,
                                        bias=False)
        self.preprocess_conv = nn.Conv1d(c.io_channels, c.io_channels, 1, bias=False)
        self.project_in = nn.Linear(c.io_channels, d, bias=False)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.project_out = nn.Linear(d, c.io_channels, bias=False)
        self.postprocess_conv = nn.Conv1d(c.io_channels, c.io_channels, 1, bias=False)

    def request_state(self, context: Tensor | None, global_cond: Tensor | None) -> tuple[Tensor | None, ...]:
        """The part of a forward that depends on the request alone: every block's cross-attention keys and values
        ``[depth, B, L, 2 x cond width]`` (None without a context) and the projected global condition ``[B, D]``
        (None without one)."""
        c = self.config
        kv = None
        if context is not None and c.cond_token_dim > 0:
            context = self.to_cond_embed(context)
            kv = torch.stack([layer.cross_attn.to_kv(context) for layer in self.layers if layer.cross_attend])
        glob = self.to_global_embed(global_cond) if global_cond is not None and c.global_cond_dim > 0 else None
        return kv, glob

    def hidden(self, x: Tensor, t: Tensor, context: Tensor | None = None, global_cond: Tensor | None = None,
               frame_mask: Tensor | None = None, state: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """The transformer's hidden states after its layers: [B, 1 + T, embed_dim], the prepended global token
        first. ``state``: the request's ``request_state``, kept from an earlier step (then ``context`` and
        ``global_cond`` are not read)."""
        c = self.config
        b, _, length = x.shape
        kv, global_embed = state if state is not None else self.request_state(context, global_cond)
        feats = 2 * math.pi * t.to(x.dtype)[:, None] @ self.timestep_features.T
        glob = self.to_timestep_embed(torch.cat([feats.cos(), feats.sin()], dim=-1))
        if global_embed is not None:
            glob = global_embed + glob
        h = self.project_in((self.preprocess_conv(x) + x).transpose(1, 2))
        h = torch.cat([glob[:, None], h], dim=1)
        rope = rotary_tables(length + 1, c.rope_dim, x.device, c.head_dim)
        key_mask = None
        # all frames real: no mask (the faster attention path); reading the mask waits for the device, once per
        # batch (``AllFramesReal``), which a CUDA graph's capture and torch.compile's tracing cannot, so they always
        # take the masked path
        tracing = (self.masks_always or torch.compiler.is_compiling()
                   or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        if frame_mask is not None and (tracing or not self.all_frames_real(frame_mask)):
            key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), frame_mask.bool()], dim=1)
        cross = iter(kv if kv is not None else ())
        for layer in self.layers:
            h = layer(h, next(cross, None) if layer.cross_attend else None, rope, key_mask)
        return h

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, global_cond: Tensor | None = None,
                frame_mask: Tensor | None = None, state: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """x [B, C, T], t [B] (model time), context [B, L, cond_token_dim], global_cond [B, global_cond_dim],
        frame_mask [B, T] bool (True = real frame) -> raw output [B, C, T]; ``state`` as in ``hidden``."""
        h = self.hidden(x, t, context, global_cond, frame_mask, state)
        out = self.project_out(h).transpose(1, 2)[:, :, 1:]
        out = self.postprocess_conv(out) + out
        if frame_mask is not None:
            out = out * frame_mask[:, None].to(out.dtype)
        return out

    def to_config(self) -> dict:
        return asdict(self.config)


class NumberEmbedder(nn.Module):
    """A number in [min_val, max_val] -> one conditioning token: clamp, normalise to [0, 1], learned Fourier
    features (x, sin, cos) -> linear (stable-audio-tools' NumberConditioner / diffusers' number conditioner)."""

    def __init__(self, out_dim: int, min_val: float, max_val: float, features: int = 256):
        super().__init__()
        self.min_val, self.max_val = float(min_val), float(max_val)
        self.weights = nn.Parameter(torch.randn(features // 2))
        self.proj = nn.Linear(features + 1, out_dim)

    def forward(self, values: Tensor) -> Tensor:
        x = (values.float().clamp(self.min_val, self.max_val) - self.min_val) / (self.max_val - self.min_val)
        x = x.to(self.proj.weight.dtype)[:, None]
        freqs = x * self.weights[None] * 2 * math.pi
        return self.proj(torch.cat([x, freqs.sin(), freqs.cos()], dim=-1))


# ---------------------------------------------------------------------------------------------- key translation
def stable_audio_tools_key(key: str) -> str:
    """A stable-audio-tools DiffusionTransformer key (after the ``model.model.`` prefix) -> ours."""
    key = key.replace("transformer.layers.", "layers.").replace("transformer.project_", "project_")
    key = key.replace("timestep_features.weight", "timestep_features")
    for norm in ("pre_norm", "cross_attend_norm", "ff_norm"):
        key = key.replace(f"{norm}.gamma", f"{norm}.weight").replace(f"{norm}.beta", f"{norm}.bias")
    return key.replace(".ff.ff.0.proj.", ".ff.proj_in.").replace(".ff.ff.2.", ".ff.proj_out.")


def number_embedder_key(key: str) -> str:
    """A NumberEmbedder key from either reference (``embedder.embedding.{0,1}`` or
    ``time_positional_embedding.{0,1}``) -> ours."""
    for stem in ("embedder.embedding.", "time_positional_embedding."):
        if key.startswith(stem):
            rest = key[len(stem):]
            return "weights" if rest == "0.weights" else rest.replace("1.", "proj.", 1)
    return key


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers StableAudioDiTModel weights -> ours (fusing q/k/v, adding the time-feature axis)."""
    out: dict[str, Tensor] = {}
    sd = dict(state_dict)
    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}):
        p = f"transformer_blocks.{i}."
        qkv = [p + f"attn1.to_{n}.weight" for n in "qkv"]
        if all(k in sd for k in qkv):
            out[f"layers.{i}.self_attn.to_qkv.weight"] = torch.cat([sd.pop(k) for k in qkv])
        kv = [p + "attn2.to_k.weight", p + "attn2.to_v.weight"]
        if all(k in sd for k in kv):
            out[f"layers.{i}.cross_attn.to_kv.weight"] = torch.cat([sd.pop(k) for k in kv])
    inner = [("attn1.to_out.0.", "self_attn.to_out."), ("attn2.to_out.0.", "cross_attn.to_out."),
             ("attn2.to_q.", "cross_attn.to_q."), ("attn1.norm_q.", "self_attn.q_norm."),
             ("attn1.norm_k.", "self_attn.k_norm."), ("attn2.norm_q.", "cross_attn.q_norm."),
             ("attn2.norm_k.", "cross_attn.k_norm."), (".norm1.", ".pre_norm."), (".norm2.", ".cross_attend_norm."),
             (".norm3.", ".ff_norm."), (".ff.net.0.proj.", ".ff.proj_in."), (".ff.net.2.", ".ff.proj_out.")]
    top = [("transformer_blocks.", "layers."), ("timestep_proj.", "to_timestep_embed."),
           ("global_proj.", "to_global_embed."), ("cross_attention_proj.", "to_cond_embed."),
           ("proj_in.", "project_in."), ("proj_out.", "project_out.")]
    for key, value in sd.items():
        if key == "time_proj.weight":
            out["timestep_features"] = value[:, None]
            continue
        for old, new in top:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.startswith("layers."):
            for old, new in inner:
                key = key.replace(old, new)
        out[key] = value
    return out
