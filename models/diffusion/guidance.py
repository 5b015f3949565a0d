"""Classifier-free guidance: pred = uncond + w (cond - uncond), w = 1 means no guidance."""
from __future__ import annotations

from torch import Tensor

from models.diffusion.schedules import _bc


def apply_guidance(cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
    """Combine raw outputs [B, C, ...] with a per-sample guidance scale of shape [B]."""
    scale = _bc(scale.to(cond.dtype), cond)
    return uncond + scale * (cond - uncond)
