"""A Stable Audio 3 checkpoint's networks, whatever its layout: ``Plan`` (what its configs say), ``Parts`` (the
DiT, the duration embedder and the SAME autoencoder under one name space, so one strict fit reports every problem)
and ``StableAudio3Denoiser``, the DiT behind the project's denoiser call (``models.checkpoints.denoisers`` has the
other families'): ``denoiser(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=None, local_cond=None)
-> velocity``.

The denoiser assembles the model's conditioning as the references do: the requested duration through the duration
embedder is the global condition and also one more context token after the text; the T5Gemma states are padded (or
cut) to the tokenizer's ``text_len`` positions, every position without a real token becoming the DiT's learned
padding embedding. ``local_cond`` is the inpainting input, [B, 1 + C, T]: the keep mask, then the known latents times it
(a row of zeros: no inpainting). t is the rectified-flow noise level; the DiT sees ``time_scale`` x t (diffusers
hands it its scheduler's timesteps, sigma x ``num_train_timesteps``).

The unconditional branch of guidance is the empty prompt's encoding, as diffusers' ``StableAudio3Pipeline`` builds
it (Stability's own samplers zero the whole context instead, or leave only padding embeddings).

What depends on a request alone, not on the step (the conditioning's cross-attention keys and values, the duration's
global embedding: ~13 % of a DiT forward for a 10 s clip of Small; and the blocks' embeddings of an inpainting
input), is computed once per request and kept in a ``RequestCache`` while the request's batch lives; the ONNX
Runtime runtime keeps the same for its graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.request_cache import RequestCache, cache_state, context_rows, row_digest
from models.checkpoints.same_autoencoder import SAMECodec, SAMEConfig
from models.checkpoints.stable_audio_3_dit import DurationEmbedder, StableAudio3DiT, StableAudio3DiTConfig

HALF_LOGSNR = (-6.2, 2.0)  # the ping-pong grid's range: both references' logsnr_min / logsnr_max (half-logSNR here)
MAX_LATENT_FRAMES = 4096  # the longest the DiT was trained on (Stability's engines take 1 .. 4096 frames: 380 s)
SMALL_MAX_SECONDS = 120.0  # Small's published limit (its configs do not state one in the diffusers layout)
SMALL_WIDTH = 1024


@dataclass
class Plan:
    """What a checkpoint's configs say, checked. ``distilled``: the adversarially post-trained model (ping-pong,
    8 steps), else the base model (Euler); ``time_scale``: what the DiT's time input is per unit of noise level."""

    layout: str
    dit: StableAudio3DiTConfig
    codec: SAMEConfig
    duration: dict = field(default_factory=dict)  # DurationEmbedder's arguments
    text_len: int = 256
    time_scale: float = 1.0
    distilled: bool = True
    half_logsnr: tuple[float, float] = HALF_LOGSNR
    max_duration: float = 0.0

    def published_max_duration(self, seconds_max: float) -> float:
        """Small: 120 s; otherwise the trained maximum of 4096 latent frames, within the duration embedder's range."""
        if self.dit.embed_dim == SMALL_WIDTH:
            return SMALL_MAX_SECONDS
        return min(float(seconds_max), MAX_LATENT_FRAMES * self.codec.hop / self.codec.sample_rate)


class Parts(nn.Module):
    def __init__(self, plan: Plan):
        super().__init__()
        self.dit = StableAudio3DiT(plan.dit)
        self.duration = DurationEmbedder(plan.dit.global_cond_dim, **plan.duration)
        self.codec = SAMECodec(plan.codec)


class StableAudio3Denoiser(nn.Module):
    """``forward`` = ``run`` over ``request_state`` and ``local_embeddings``, which depend on the request alone and
    are kept per request (``RequestCache``) under inference; the ONNX export makes one graph of each
    (``splits_request_state``)."""

    splits_request_state = True
    cache_requests = True  # False: compute every request's part at every step (a reference for tests)

    def __init__(self, dit: StableAudio3DiT, duration: DurationEmbedder, text_len: int, time_scale: float = 1.0):
        super().__init__()
        self.dit = dit
        self.duration = duration
        self.text_len = int(text_len)
        self.time_scale = float(time_scale)
        self.request_cache = RequestCache()
        self.local_cache = RequestCache()

    @property
    def local_cond_dim(self) -> int:
        """Channels of the trained inpainting input (keep mask + latents), 0 for none."""
        return self.dit.config.local_cond_dim

    def conditioning(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(context [B, text_len + 1, D], its mask, the duration embedding [B, D])."""
        glob = self.duration(seconds.to(tokens.device))
        pad = self.text_len - tokens.shape[1]
        text = F.pad(tokens, (0, 0, 0, pad))[:, : self.text_len]
        mask = F.pad(token_mask.bool(), (0, pad))[:, : self.text_len]
        context = torch.cat([text, glob[:, None].to(text.dtype)], dim=1)
        return context, F.pad(mask, (0, 1), value=True), glob

    def request_state(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The request's part of the forward (``StableAudio3DiT.request_state``): cross-attention keys and values
        of every block, the global embedding."""
        context, mask, glob = self.conditioning(tokens, token_mask, seconds)
        return self.dit.request_state(context, mask, glob.to(tokens.dtype))

    def local_embeddings(self, local_cond: Tensor) -> Tensor | None:
        return self.dit.local_embeddings(local_cond, local_cond.dtype)

    def context_rows(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> list[bytes]:
        return context_rows(tokens, token_mask, seconds, self.text_len)

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor | None = None, guidance: Tensor | None = None,
                local_cond: Tensor | None = None) -> Tensor:
        tokens = tokens.to(z.dtype)
        state = cache_state(self, z) if self.cache_requests else None
        if state is None:
            keys, values, glob = self.request_state(tokens, token_mask, seconds)
        else:
            keys, values, glob = self.request_cache.get((tokens, token_mask, seconds), state, self.request_state,
                                                        self.context_rows, axes=(1, 1, 0))
        local = None
        if local_cond is not None and self.dit.config.local_cond_dim:
            local_cond = local_cond.to(z.dtype)
            local = self.local_embeddings(local_cond) if state is None else self.local_cache.get(
                (local_cond,), state, self.local_embeddings, lambda x: [row_digest(r) for r in x], axes=(1,))[0]
        return self.run(z, t, keys, values, glob, frame_mask, local)

    def run(self, z: Tensor, t: Tensor, keys: Tensor, values: Tensor, global_embed: Tensor,
            frame_mask: Tensor | None = None, local: Tensor | None = None) -> Tensor:
        """One step from the request's ``request_state`` and ``local_embeddings`` (None: no inpainting input); t in
        the pipeline's units (the noise level)."""
        return self.dit.run(z, t.to(z.dtype) * self.time_scale, keys, values, global_embed, frame_mask, local)
