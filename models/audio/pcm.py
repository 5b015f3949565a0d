"""16-bit PCM: the one conversion from float waveforms, wherever it runs (the service's encoder on the host, a whole
generation's graph on the device)."""
from __future__ import annotations

import torch
from torch import Tensor

PCM16_SCALE = 32767.0


def pcm16(wave: Tensor) -> Tensor:
    """Float samples in [-1, 1] (clipped) -> int16 on the same device, rounded to nearest (ties to even)."""
    return torch.round(wave.float().clamp(-1.0, 1.0) * PCM16_SCALE).to(torch.int16)
