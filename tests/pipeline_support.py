"""Test helpers that drive ``models.pipeline`` the way the engine does."""
from __future__ import annotations

import torch

from models.pipeline import DenoiseBatch, Pipeline, SampleRequest


def join_and_leave(pipeline: Pipeline, requests: list[SampleRequest]) -> list[torch.Tensor]:
    """Three requests (steps >= 5, 8, 4) run as the engine runs them: the third joins after 3 steps, the first
    leaves after its 5th, the second after its 8th; their final latents."""
    a, b, c = pipeline.start(requests)
    for members, steps in (([a, b], 3), ([a, b, c], 2), ([b, c], 3), ([c], 1)):
        batch = DenoiseBatch(members)
        for _ in range(steps):
            pipeline.step(batch)
    assert all(s.finished for s in (a, b, c))
    return [s.z for s in (a, b, c)]
