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


class EagerReplay:
    """What ``record_eagerly`` returns in place of a CUDA graph: ``replay()`` reruns the recorded program and writes
    its result into the tensor the recording returned, as a graph rewrites its static output."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        result = self.fn()
        if isinstance(self.out, torch.Tensor):
            self.out.copy_(result)
        self.replays += 1


def record_eagerly(fn, pool=None, warmups: int = 2, before_capture=None):
    """``models.cuda_capture.capture``'s contract without CUDA (the warm-ups, ``before_capture``, the recorded call),
    for the CPU tests of everything around a replay: what is copied into a recorded program's fixed tensors, and
    what is copied out of its output."""
    for _ in range(warmups):
        fn()
    if before_capture is not None:
        before_capture()
    out = fn()
    return EagerReplay(fn, out), out
