"""Timing a denoiser forward without making the host wait for the device.

A batch that lives on a GPU steps without a host round-trip: the engine thread queues a tick's work and goes on, so
the wall time of the call is the time to queue it, not to run it. On a CUDA device the clock records a pair of events
around each forward on the current stream and reads their interval once the device has passed the second one, at a
later tick (``ready``), so measuring never adds a synchronisation. On a CPU the call's wall time is the forward's.
"""
from __future__ import annotations

import time
from collections import deque

import torch


class ForwardClock:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: deque = deque()  # (work, start event, end event), in stream order
        self._done: list[tuple[float, float]] = []

    def start(self):
        """A mark before the forward is queued."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, mark, work: float) -> None:
        """The forward over ``work`` (batch x padded frames) begun at ``mark`` is queued (CUDA) or done (CPU)."""
        if not self.cuda:
            self._done.append((work, time.perf_counter() - mark))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((work, mark, end))

    def ready(self, wait: bool = False) -> list[tuple[float, float]]:
        """The (work, seconds) of the forwards that have finished since the last call, in order; ``wait``: wait
        for those still running first (calibration, before serving)."""
        while self._pending and (wait or self._pending[0][2].query()):
            work, start, end = self._pending.popleft()
            end.synchronize()
            self._done.append((work, start.elapsed_time(end) / 1000.0))
        out, self._done = self._done, []
        return out
