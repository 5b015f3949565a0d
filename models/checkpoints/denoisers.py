"""Adapters that give foreign networks the project's denoiser call:
``denoiser(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=None) -> raw output [B, C, T]``,
with t the project's time in [0, 1] on the bundle's schedule. Each adapter assembles its model's conditioning from
the text embedding and the requested duration, and converts t to the time input the network was trained with.

The null condition: a text embedding whose mask has no real token (``CheckpointBundle.unconditional_text``) stands
for classifier-free guidance's unconditional branch. Stable Audio models were trained with the whole cross-attention
input (text tokens and duration tokens) zeroed for it, so the Stable Audio adapter zeroes it for such rows; UNet
models (Tango) use the empty prompt's encoding, which is an ordinary embedding.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.checkpoints.mel_vae import from_mel_layout, to_mel_layout
from models.checkpoints.request_cache import RequestCache, cache_state, context_rows
from models.checkpoints.stable_audio_dit import NumberEmbedder, StableAudioDiT
from models.checkpoints.unet import UNet2DCondition
from models.diffusion.discrete import DiscreteVPSchedule
from models.diffusion.schedules import NoiseSchedule

NUMBER_INPUTS = ("seconds_start", "seconds_total")


class StableAudioDenoiser(nn.Module):
    """Stable Audio DiT + its number conditioners + the conditioning layout of its config.

    ``cross_ids`` / ``global_ids`` name, in order, the conditioners whose outputs are concatenated along the token
    axis (cross-attention) and the channel axis (global condition); ``text_id`` is the T5 conditioner's id. Text
    tokens are zeroed past each prompt's end and padded to ``text_len`` tokens, as the reference tokenizer pads to
    max_length and attends to every position. ``objective`` is "rectified_flow" (model time = t) or "v" (model time
    = the cosine-schedule time with the same noise level: 2/pi atan(sigma / alpha)). Under inference the request's
    part of a forward (``request_state``) is kept per request (``RequestCache``).
    """

    cache_requests = True  # False: compute every request's part at every step (a reference for tests)

    def __init__(self, dit: StableAudioDiT, numbers: dict[str, NumberEmbedder], cross_ids: list[str],
                 global_ids: list[str], text_id: str, text_len: int, objective: str, schedule: NoiseSchedule,
                 text_proj: nn.Module | None = None):
        super().__init__()
        self.dit = dit
        self.numbers = nn.ModuleDict(numbers)
        self.cross_ids, self.global_ids, self.text_id = list(cross_ids), list(global_ids), text_id
        self.text_len = int(text_len)
        self.objective = objective
        self.schedule = schedule
        self.text_proj = text_proj
        self.request_cache = RequestCache()

    def model_time(self, t: Tensor) -> Tensor:
        if self.objective in ("rectified_flow", "rf_denoiser"):
            return t
        alpha, sigma = self.schedule.alpha_sigma(t)
        return torch.atan2(sigma, alpha) * (2 / math.pi)

    def conditioning(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor | None, Tensor | None]:
        values = {"seconds_start": torch.zeros_like(seconds, dtype=torch.float32), "seconds_total": seconds.float()}
        numbers = {k: m(values[k].to(tokens.device)) for k, m in self.numbers.items()}
        context = None
        if self.cross_ids:
            text = self.text_proj(tokens) if self.text_proj is not None else tokens
            text = (text * token_mask[..., None].to(text.dtype))[:, : self.text_len]
            text = nn.functional.pad(text, (0, 0, 0, self.text_len - text.shape[1]))
            parts = [text if k == self.text_id else numbers[k][:, None] for k in self.cross_ids]
            context = torch.cat(parts, dim=1)
            null = ~token_mask.bool().any(dim=1)
            context = context.masked_fill(null[:, None, None], 0.0)
        glob = torch.cat([numbers[k] for k in self.global_ids], dim=-1) if self.global_ids else None
        return context, glob

    def request_state(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor | None, ...]:
        """The request's part of a forward (``StableAudioDiT.request_state``): the blocks' cross-attention keys and
        values and the projected global condition."""
        return self.dit.request_state(*self.conditioning(tokens, token_mask, seconds))

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        model_t = self.model_time(t.to(z.dtype))
        cache = cache_state(self, z) if self.cache_requests and self.cross_ids and self.global_ids else None
        if cache is None:
            return self.dit(z, model_t, *self.conditioning(tokens, token_mask, seconds), frame_mask)
        # kept per request: computed when a request first takes part in a batch, not at every step
        state = self.request_cache.get((tokens, token_mask, seconds), cache, self.request_state,
                                       lambda *x: context_rows(*x, self.text_len), axes=(1, 0))
        return self.dit(z, model_t, frame_mask=frame_mask, state=state)

    # the transformer-trunk interface ARC's discriminator builds on (as models.dit.DiT has it)
    @property
    def depth(self) -> int:
        return len(self.dit.layers)

    @property
    def width(self) -> int:
        return self.dit.config.embed_dim

    def features(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                 frame_mask: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(hidden states of the frames [B, T, width], of the prepended global token [B, width])."""
        context, glob = self.conditioning(tokens, token_mask, seconds)
        h = self.dit.hidden(z, self.model_time(t.to(z.dtype)), context, glob, frame_mask)
        return h[:, 1:], h[:, 0]

    def trunk(self, depth: int) -> StableAudioDenoiser:
        """A copy with the first ``depth`` transformer layers and no output projection: its ``features``."""
        trunk = copy.deepcopy(self)
        trunk.dit.layers = nn.ModuleList(list(trunk.dit.layers)[:depth])
        del trunk.dit.project_out, trunk.dit.postprocess_conv
        return trunk


def per_length(fixed_length: Callable[..., Tensor], z: Tensor, model_t: Tensor, tokens: Tensor, token_mask: Tensor,
               frame_mask: Tensor | None) -> Tensor:
    """A batch of different lengths as one ``fixed_length(z, model_t, tokens, token_mask)`` call per distinct length
    (each on its rows, cut to that length); padded frames of the output are zero. For networks whose convolutions
    mix neighbouring frames, so that padding would leak into a sample's real frames. Every runtime's UNet path."""
    b, _, n = z.shape
    lengths = frame_mask.sum(dim=1) if frame_mask is not None else torch.full((b,), n, device=z.device)
    out = None
    for length in lengths.unique().tolist():
        rows = torch.nonzero(lengths == length).flatten()
        part = fixed_length(z[rows, :, :length], model_t[rows], tokens[rows], token_mask[rows])
        if out is None:  # [B, channels of the output, T]: the latents' or a trunk's features'
            out = z.new_zeros(b, part.shape[1], n)
        out[rows, :, :length] = part
    return out


class UNetDenoiser(nn.Module):
    """A Stable-Diffusion-style 2D UNet over mel latents. The project's latents are [B, C*F, T] (channel-major);
    the UNet sees [B, C, T, F]. Its 2D convolutions would let a sample's padded frames leak into its real ones, so a
    batch of different lengths runs as one forward per length (``per_length``: each sample exactly as it would run
    alone). ``fixed_length`` is the network on one length, the graph an ONNX export holds (``runs_per_length``)."""

    runs_per_length = True

    def __init__(self, unet: UNet2DCondition, schedule: DiscreteVPSchedule, bins: int):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.bins = bins

    def model_time(self, t: Tensor) -> Tensor:
        """The (fractional) training step the UNet is conditioned on."""
        return self.schedule.model_timestep(t)

    def fixed_length(self, z: Tensor, model_t: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """z [B, C*F, T] of one length, model_t [B] (``model_time``) -> the raw prediction [B, C*F, T]."""
        out = self.unet(to_mel_layout(z, self.bins), model_t.to(z.device), tokens, token_mask.bool())
        return from_mel_layout(out)

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        return per_length(self.fixed_length, z, self.model_time(t), tokens, token_mask, frame_mask)

    # the trunk interface ARC's discriminator builds on (as models.dit.DiT has it): the UNet's encoder half, its
    # stages being the down blocks and then the mid block
    @property
    def depth(self) -> int:
        return self.unet.stages

    @property
    def width(self) -> int:
        return self.unet.stage_channels(self.depth)

    def trunk(self, depth: int) -> UNetDenoiser:
        """A copy with the UNet's first ``depth`` stages and no decoder half: its ``features``."""
        return UNetDenoiser(self.unet.truncated(depth), self.schedule, self.bins)

    def _frame_features(self, z: Tensor, model_t: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """One length: the trunk's last hidden state averaged over mel bins and repeated back to the latent frame
        rate (each stage halves it) [B, width, T]."""
        h = self.unet.encode(to_mel_layout(z, self.bins), model_t.to(z.device), tokens, token_mask.bool()).mean(dim=3)
        return nn.functional.interpolate(h, size=z.shape[-1], mode="nearest")

    def features(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                 frame_mask: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(per-frame hidden states [B, T, width], computed per length so that padding never leaks into a clip,
        the time embedding [B, D] as the global condition)."""
        model_t = self.model_time(t)
        x = per_length(self._frame_features, z, model_t, tokens, token_mask, frame_mask)
        return x.transpose(1, 2), self.unet.embed_time(model_t.to(z.device), z.dtype)
