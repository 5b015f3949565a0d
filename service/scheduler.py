"""The scheduler: decides, every tick, which requests leave, which join the denoise set, and nothing else.

It owns per-model state (a FIFO of waiting jobs and the running set) and asks a ``Policy`` how many waiting jobs
to admit. It never touches tensors: the engine executes its decisions through a runner (vLLM's split: scheduler
decides, runner executes, metrics at the engine boundary).

Policies (``TTA_POLICY``):
- ``continuous`` (default): step-level continuous batching. Every tick admits waiting jobs while the denoise set
  holds fewer than ``max_batch`` samples; finished samples leave after their last step, so a short request never
  waits for a long one and new requests join at the next tick.
- ``request``: request-level dynamic batching, like Triton's dynamic batcher. When the denoise set is empty, wait
  until ``max_batch`` jobs are queued or the oldest has waited ``max_queue_delay_ms``, admit up to ``max_batch``,
  then run that batch to completion; newcomers wait for the whole batch to drain.
- ``none``: one request at a time.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from models.bundle import Conditioning


# ---------------------------------------------------------------------------------------------------- errors
class EngineError(Exception):
    code = "internal_error"
    status = 500


class QueueFull(EngineError):
    code, status = "queue_full", 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(EngineError):
    code, status = "timeout", 504


class Cancelled(EngineError):
    code, status = "client_closed_request", 499


class BatchFailed(EngineError):
    code, status = "internal_error", 500


class ShuttingDown(EngineError):
    code, status = "not_ready", 503


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass
class JobResult:
    latents: Tensor  # [C, frames]
    wave: Tensor  # [2, round(duration * sample_rate)] float
    sample_rate: int
    timings: dict[str, float]  # seconds: queue, encode, denoise, decode
    steps_done: int


@dataclass
class GenerationJob:
    """One request = one sample. ``on_done(result, error)`` is called exactly once, from the engine thread (or from
    whoever cancels first); the HTTP layer's callback hops back to the event loop with call_soon_threadsafe."""

    id: str
    model: str
    prompt: str
    duration: float
    steps: int
    guidance: float
    seed: int
    deadline: float  # time.monotonic() by which the answer is due
    on_done: Callable[[JobResult | None, BaseException | None], Any]
    arrival: float = field(default_factory=time.monotonic)
    cancel_reason: str | None = None
    steps_done: int = 0
    _resolved: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self, reason: str) -> None:
        """Thread-safe flag; the engine drops the job at its next tick, so it stops consuming steps."""
        self.cancel_reason = self.cancel_reason or reason

    def resolve(self, result: JobResult | None = None, error: BaseException | None = None) -> bool:
        with self._lock:
            if self._resolved:
                return False
            self._resolved = True
        self.on_done(result, error)
        return True

    @property
    def resolved(self) -> bool:
        return self._resolved


@dataclass
class Sample:
    """A running job's denoising state (the runner creates and advances it)."""

    job: GenerationJob
    frames: int
    grid: Tensor  # [steps + 1] float64, the sampler's time grid for this sample's step count
    z: Tensor  # [C, frames]
    generator: torch.Generator
    cond: Conditioning  # batch of one
    admitted: float
    index: int = 0
    encode_s: float = 0.0
    denoise_start: float = 0.0
    denoise_end: float = 0.0

    @property
    def finished(self) -> bool:
        return self.index >= self.job.steps


# ---------------------------------------------------------------------------------------------------- policies
class Policy:
    name = "base"

    def __init__(self, max_batch: int, max_queue_delay_s: float = 0.0):
        self.max_batch = max_batch
        self.max_queue_delay_s = max_queue_delay_s

    def admit(self, waiting: deque[GenerationJob], running: int, now: float) -> int:
        """How many jobs from the head of ``waiting`` join the denoise set now."""
        raise NotImplementedError

    def wakeup(self, waiting: deque[GenerationJob], running: int, now: float) -> float | None:
        """When nothing was admitted: the monotonic time at which ``admit`` may say otherwise (None = on arrival)."""
        return None


class ContinuousPolicy(Policy):
    name = "continuous"

    def admit(self, waiting, running, now):
        return max(0, min(len(waiting), self.max_batch - running))


class RequestLevelPolicy(Policy):
    name = "request"

    def admit(self, waiting, running, now):
        if running or not waiting:
            return 0
        if len(waiting) >= self.max_batch or now - waiting[0].arrival >= self.max_queue_delay_s:
            return min(len(waiting), self.max_batch)
        return 0

    def wakeup(self, waiting, running, now):
        if running or not waiting:
            return None
        return waiting[0].arrival + self.max_queue_delay_s


class NoBatchingPolicy(Policy):
    name = "none"

    def admit(self, waiting, running, now):
        return 1 if waiting and not running else 0


POLICIES = {p.name: p for p in (ContinuousPolicy, RequestLevelPolicy, NoBatchingPolicy)}


def make_policy(name: str, max_batch: int, max_queue_delay_ms: float = 0.0) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name](max_batch, max_queue_delay_ms / 1000.0)


def length_groups(frames: list[int], max_padding: float) -> list[list[int]]:
    """Split a denoise set into forwards of similar length: indices of ``frames``, longest first, grouped greedily so
    that each group's padded work (its longest length x its size) stays within ``1 + max_padding`` of its real work
    (the sum of its lengths). Samples of different lengths share a forward by padding to the longest; where a batch
    is cheaper per sample only by a little (a CPU: cost grows almost linearly with batch x length) that padding is
    pure waste, where it is much cheaper (a GPU) a large ``max_padding`` keeps one forward per tick."""
    order = sorted(range(len(frames)), key=lambda i: -frames[i])
    groups: list[list[int]] = []
    longest = real = 0
    for i in order:
        f = frames[i]
        if groups and longest * (len(groups[-1]) + 1) <= (1 + max_padding) * (real + f):
            groups[-1].append(i)
            real += f
        else:
            groups.append([i])
            longest = real = f
    return groups


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass
class SchedulerOutput:
    admitted: list[GenerationJob]
    dropped: list[tuple[GenerationJob | Sample, EngineError]]


class ModelScheduler:
    """Per-model scheduling state. Different models never share a forward pass; the engine ticks each model's
    scheduler in turn on the device's one worker thread."""

    def __init__(self, model: str, policy: Policy):
        self.model = model
        self.policy = policy
        self.waiting: deque[GenerationJob] = deque()
        self.running: list[Sample] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> SchedulerOutput:
        dropped: list[tuple[GenerationJob | Sample, EngineError]] = []

        def verdict(job: GenerationJob) -> EngineError | None:
            if job.cancel_reason == "timeout" or now >= job.deadline:
                return DeadlineExceeded(f"request {job.id} passed its deadline")
            if job.cancel_reason is not None:
                return Cancelled(f"request {job.id} was cancelled ({job.cancel_reason})")
            return None

        keep_waiting: deque[GenerationJob] = deque()
        for job in self.waiting:
            if (err := verdict(job)) is not None:
                dropped.append((job, err))
            else:
                keep_waiting.append(job)
        self.waiting = keep_waiting
        keep_running = []
        for s in self.running:
            if (err := verdict(s.job)) is not None:
                dropped.append((s, err))
            else:
                keep_running.append(s)
        self.running = keep_running
        n = self.policy.admit(self.waiting, len(self.running), now)
        admitted = [self.waiting.popleft() for _ in range(n)]
        return SchedulerOutput(admitted, dropped)

    def wakeup(self, now: float) -> float | None:
        return self.policy.wakeup(self.waiting, len(self.running), now)
