"""What every CUDA graph of the project shares: the capture itself and the buckets that padded inputs are rounded to.

A graph holds fixed shapes and fixed memory, so its callers copy inputs into static tensors padded to a bucket, and
copy what they need out of its static outputs before the next replay. Three kinds are captured: the denoiser's
forward (``service.runtimes.cuda_graphs``), the text encoder's (``models.text.encoder_graphs``) and a whole generation
(``models.generation_graph``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_bucket(rows: int) -> int:
    """The smallest bucket holding ``rows`` (beyond the table: the next multiple of its last step)."""
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return round_up(rows, ROW_BUCKETS[-1] - ROW_BUCKETS[-2])


def capture(fn: Callable[[], T], pool=None, warmups: int = 2,
            before_capture: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Call ``fn`` ``warmups`` times on a side stream (lazy initialisation, cuDNN's autotuning and the allocator's
    first requests happen there, outside the graph, as capture requires), then record one call. Returns the graph
    and what the recorded call returned: its static outputs, rewritten by every replay. ``before_capture`` runs
    between the two (e.g. to put back state the warm-up changed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    # thread-local: CUDA calls other threads make meanwhile (the HTTP side) do not break this capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out
