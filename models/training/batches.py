"""What every denoiser trainer (teacher, distillation, ARC) feeds a step: a padded batch of cached latents with
fresh captions, their text embeddings and durations, and the MSE over real (unpadded) frames."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.conditioning import Conditioning
from models.text import TextEmbedding
from models.training.latent_cache import LatentCache, sample_batch


@dataclass
class CaptionedBatch:
    x0: Tensor  # [B, C, T] latents, zero past each clip's end
    mask: Tensor  # [B, T] bool, True on real frames
    idx: list[int]  # cache indices
    prompts: list[str]  # the captions actually encoded ("" where the condition was dropped)
    text: TextEmbedding
    seconds: Tensor  # [B] clip durations (the duration conditioning)

    def __len__(self) -> int:
        return self.x0.shape[0]

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(self.text, self.seconds)

    def to(self, device) -> CaptionedBatch:
        text = TextEmbedding(self.text.tokens.to(device), self.text.mask.to(device), self.text.pooled.to(device))
        return CaptionedBatch(self.x0.to(device), self.mask.to(device), self.idx, self.prompts, text,
                              self.seconds.to(device))


def sample_captioned_batch(cache: LatentCache, corpus, text_encoder, rng: np.random.Generator, batch_size: int,
                           cond_dropout: float = 0.0, null_text=None, max_frames: int | None = None,
                           augment=None) -> CaptionedBatch:
    """Clips drawn uniformly from the cache, each with a freshly drawn caption of its ground truth (the corpus
    words the same sound many ways), and the empty prompt with probability ``cond_dropout`` (what classifier-free
    guidance's unconditional branch is trained on). ``null_text(n) -> TextEmbedding``, when given, is the model's
    own unconditional input for those rows (a checkpoint's null condition need not be the empty prompt's
    encoding). ``max_frames``: the model's longest window; a longer clip is cut to a random window of it, with
    the window's duration as the duration condition. ``augment(x0, mask, params, rng) -> (x0, params)``, when
    given, changes some clips and their ground truth before they are captioned (``models.training.augment``)."""
    x0, mask, idx, share = sample_batch(cache, rng, batch_size, max_frames)
    params = [cache.params[i] for i in idx]
    if augment is not None:
        x0, params = augment(x0, mask, params, rng)
    prompts = [corpus.caption(p, rng) for p in params]
    prompts = ["" if rng.random() < cond_dropout else p for p in prompts]
    text = text_encoder.encode(prompts)
    dropped = [i for i, p in enumerate(prompts) if not p]
    if null_text is not None and dropped:
        text = with_rows(text, dropped, null_text(len(dropped)))
    seconds = torch.tensor([cache.durations[i] * f for i, f in zip(idx, share)], dtype=torch.float32)
    return CaptionedBatch(x0, mask, idx, prompts, text, seconds)


def with_rows(text: TextEmbedding, rows: list[int], other: TextEmbedding) -> TextEmbedding:
    """``text`` with ``rows`` replaced by ``other``'s rows, both padded to the longer token length."""
    length = max(text.tokens.shape[1], other.tokens.shape[1])

    def pad(e: TextEmbedding) -> tuple[Tensor, Tensor]:
        extra = length - e.tokens.shape[1]
        return (torch.nn.functional.pad(e.tokens, (0, 0, 0, extra)),
                torch.nn.functional.pad(e.mask, (0, extra), value=False))

    (tokens, mask), (o_tokens, o_mask) = pad(text), pad(other)
    tokens, mask, pooled = tokens.clone(), mask.clone(), text.pooled.clone()
    tokens[rows], mask[rows], pooled[rows] = o_tokens.to(tokens.dtype), o_mask, other.pooled.to(pooled.dtype)
    return TextEmbedding(tokens, mask, pooled)


def latent_channel_weight(codec, analytic_weight: float) -> torch.Tensor | None:
    """Per-channel loss weights [D]: ``analytic_weight`` on a codec's leading analytic channels (the harmonic codec's
    tonality / pitch / balance), 1 elsewhere; None (the plain mean) when the weight is 1 or the codec has none."""
    analytic = codec.analytic_channels
    if analytic_weight == 1.0 or analytic == 0:
        return None
    weight = torch.ones(codec.latent_dim)
    weight[:analytic] = analytic_weight
    return weight


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, channel_weight: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error over real frames only: [B]. ``channel_weight`` [D] makes it a weighted mean
    over latent channels (the weights are normalised, so all ones is the plain mean), on whatever device ``pred`` is."""
    m = mask[:, None, :].to(pred.dtype)
    se = (pred - target) ** 2 * m
    if channel_weight is None:
        return se.sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * pred.shape[1])
    w = channel_weight.to(pred.device, pred.dtype)
    return (se.sum(dim=2) * w).sum(dim=1) / (m.sum(dim=(1, 2)) * w.sum())
