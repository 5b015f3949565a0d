"""Classifier-free guidance: pred = uncond + w (cond - uncond), w = 1 means no guidance."""
from __future__ import annotations

from torch import Tensor

from models.diffusion.schedules import _bc


def apply_guidance(cond: Tensor, uncond: Tensor, scale: Tensor, lead: tuple[int, float] | None = None) -> Tensor:
    """Combine raw outputs [B, C, ...] with a per-sample guidance scale of shape [B]. ``lead = (k, w)``: the first k
    channels are guided at w instead (``BundleConfig.pitch_guidance``)."""
    scale = _bc(scale.to(cond.dtype), cond)
    if lead is not None and lead[0] > 0:
        k, w = lead
        scale = scale.expand(-1, cond.shape[1], *([1] * (cond.dim() - 2))).clone()
        scale[:, :k] = w
    return uncond + scale * (cond - uncond)
