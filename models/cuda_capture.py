"""What every CUDA graph of the project shares: the capture itself and the buckets that padded inputs are rounded to.

A graph holds fixed shapes and fixed memory, so its callers copy inputs into static tensors padded to a bucket, and
copy what they need out of its static outputs before the next replay. Three kinds are captured: the denoiser's
forward (``service.runtimes.cuda_graphs``), the text encoder's (``models.text.encoder_graphs``) and a whole generation
(``models.generation_graph``). Each keeps its graphs in a ``GraphCache``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# how a program is recorded: ``capture``'s signature (fn, pool, warmups=, before_capture=) -> (graph, fn's output);
# the graph's ``replay()`` reruns it into the same output tensors
Record = Callable[..., tuple[Any, Any]]

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


class GraphCache(Generic[K, T]):
    """Captured graphs by key: at most ``max_graphs``, the least recently used dropped first (a dropped key met
    again is captured again), all recorded into one memory pool made at the first capture (``new_pool``, CUDA's by
    default). Sharing the pool is safe because replays never overlap (one engine thread per device) and every caller
    copies what it keeps out of a graph's static outputs before the next replay. Without CUDA the pool is None (a
    program recorded by other means than ``capture``)."""

    def __init__(self, max_graphs: int, new_pool: Callable[[], object] | None = None):
        if max_graphs < 1:
            raise ValueError(f"a graph cache keeps at least one graph, got max_graphs={max_graphs}")
        self.max_graphs = max_graphs
        self.captures = 0  # graphs made, the dropped ones included
        self._graphs: OrderedDict[K, T] = OrderedDict()
        self._new_pool = new_pool if new_pool is not None else _new_pool
        self._pool = None

    def get(self, key: K, make: Callable[[object], T]) -> T:
        """The graph kept for ``key``, or one made now by ``make(pool)`` (a capture into the shared pool). When
        ``make`` raises, nothing is kept for the key and the error propagates."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        if self._pool is None:
            self._pool = self._new_pool()
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        graph = self._graphs[key] = make(self._pool)
        self.captures += 1
        return graph

    def __len__(self) -> int:
        return len(self._graphs)

    def items(self) -> list[tuple[K, T]]:
        """The kept (key, graph) pairs, least recently used first."""
        return list(self._graphs.items())

    def __contains__(self, key: object) -> bool:
        return key in self._graphs


class Sightings:
    """How many times each shape has been met, for the ``kept`` shapes met most recently (an older one counts from
    zero again). A capture costs several calls' time, so callers capture a shape only once it recurs."""

    def __init__(self, kept: int = 256):
        self.kept = kept
        self._seen: OrderedDict[Hashable, int] = OrderedDict()

    def items(self) -> list[tuple[Hashable, int]]:
        """The remembered (shape, count) pairs, least recently met first."""
        return list(self._seen.items())

    def count(self, shape: Hashable) -> int:
        """Sightings of ``shape`` so far (0 for one not met, or forgotten)."""
        return self._seen.get(shape, 0)

    def see(self, shape: Hashable) -> int:
        """Count one more sighting of ``shape``; returns its count, this one included."""
        seen = self._seen.pop(shape, 0) + 1
        self._seen[shape] = seen
        while len(self._seen) > self.kept:
            self._seen.popitem(last=False)
        return seen


def _new_pool():
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
