"""What the denoiser is conditioned on, and the padding that lets samples of different lengths share a batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.text import TextEmbedding
from models.text.encoders import pad_stack


@dataclass
class Conditioning:
    """Everything the denoiser is conditioned on, batched."""

    text: TextEmbedding
    seconds: Tensor  # [B] requested duration

    def select(self, index) -> Conditioning:
        return Conditioning(self.text.select(index), self.seconds[index])

    def to(self, device) -> Conditioning:
        return Conditioning(self.text.to(device), self.seconds.to(device))


def concat_conditioning(items: list[Conditioning]) -> Conditioning:
    """One batch from several, each row's tokens re-padded to the longest prompt of the new batch."""
    return Conditioning(concat_text([c.text for c in items]), torch.cat([c.seconds for c in items]))


def concat_text(items: list[TextEmbedding]) -> TextEmbedding:
    """One text batch from several, each row's tokens re-padded to the longest of the new batch (a row without a
    real token, a null condition, stays all masked)."""
    rows = [t for text in items for t in unpad(text)]
    length = max(1, max(t.shape[0] for t in rows))
    tokens, mask = pad_stack(rows, length)
    return TextEmbedding(tokens, mask, torch.cat([text.pooled for text in items]))


def unpad(text: TextEmbedding) -> list[Tensor]:
    lengths = text.mask.sum(1).tolist()
    return [text.tokens[i, :n] for i, n in enumerate(lengths)]


def pad_axis(x: Tensor, length: int, dim: int) -> Tensor:
    """Zero-pad axis ``dim`` (>= 0) of ``x`` to ``length`` (False for a bool tensor)."""
    if x.shape[dim] == length:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
    return F.pad(x, pad)


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad the token axis (dim 1) of a text batch to ``length``."""
    return pad_axis(x, length, 1)


class AllFramesReal:
    """Whether every frame of a frame mask [B, T] is real, read once per mask tensor. Reading a mask back waits for
    its device; a running batch hands the same mask tensor to every one of its steps (``models.pipeline.DenoiseBatch``),
    so a denoiser that attends faster without a mask asks here and waits once per batch, not once per step."""

    def __init__(self) -> None:
        self._seen: tuple[Tensor, bool] | None = None

    def __call__(self, frame_mask: Tensor) -> bool:
        if self._seen is None or self._seen[0] is not frame_mask:
            self._seen = (frame_mask, bool(frame_mask.all()))
        return self._seen[1]
