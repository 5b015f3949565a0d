"""What every denoiser trainer (teacher, distillation, ARC) feeds a step: a padded batch of cached latents with
fresh captions, their text embeddings and durations, and the MSE over real (unpadded) frames."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.bundle import Conditioning
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
                           cond_dropout: float = 0.0) -> CaptionedBatch:
    """Clips drawn uniformly from the cache, each with a freshly drawn caption of its ground truth (the corpus
    words the same sound many ways), and the empty prompt with probability ``cond_dropout`` (what classifier-free
    guidance's unconditional branch is trained on)."""
    x0, mask, idx = sample_batch(cache, rng, batch_size)
    prompts = [corpus.caption(cache.params[i], rng) for i in idx]
    prompts = ["" if rng.random() < cond_dropout else p for p in prompts]
    text = text_encoder.encode(prompts)
    seconds = torch.tensor([cache.durations[i] for i in idx], dtype=torch.float32)
    return CaptionedBatch(x0, mask, idx, prompts, text, seconds)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-sample mean squared error over real frames only: [B]."""
    m = mask[:, None, :].to(pred.dtype)
    return ((pred - target) ** 2 * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * pred.shape[1])
