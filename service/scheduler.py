"""The scheduler: owns the request lifecycle and decides, every tick, which requests leave and which join the
denoise set.

``ModelScheduler`` holds one model's state (a FIFO of waiting jobs, the running set, each job's ``JobState``) and
asks a ``Policy`` which waiting jobs to admit. It never touches tensors: the engine executes its decisions through a
runner and reports the outcomes back (vLLM's split: scheduler decides, runner executes, metrics at the engine
boundary).

Policies (``TTA_POLICY``):
- ``continuous`` (default): step-level continuous batching. Every tick admits waiting jobs while the denoise set
  holds fewer than ``max_batch`` samples; finished samples leave after their last step, so a short request never
  waits for a long one and new requests join at the next tick.
- ``adaptive``: the same, but a waiting job joins only when a cost model of the device's forwards (learnt as they
  run, ``service/costmodel.py``) says that lowers the summed completion time of the jobs concerned; behaves like
  ``continuous`` where batching is cheap and like ``none`` where it is not, until a queue builds.
- ``request``: request-level dynamic batching, like Triton's dynamic batcher. When the denoise set is empty, wait
  until ``max_batch`` jobs are queued or the oldest has waited ``max_queue_delay_ms``, admit up to ``max_batch``,
  then run that batch to completion; newcomers wait for the whole batch to drain.
- ``none``: one request at a time.
"""
from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.costmodel import ForwardCost
from service.jobs import Cancelled, DeadlineExceeded, EngineError, GenerationJob, JobState, Sample


# ---------------------------------------------------------------------------------------------------- policies
class Policy:
    name = "base"
    prices_batching = False  # reads the engine's ForwardCost (which the engine then calibrates before starting)

    def __init__(self, max_batch: int, max_queue_delay_s: float = 0.0):
        self.max_batch = max_batch
        self.max_queue_delay_s = max_queue_delay_s

    def admit(self, waiting: deque[GenerationJob], running: list[Sample], now: float) -> int:
        """How many jobs from the head of ``waiting`` join the denoise set now."""
        raise NotImplementedError

    def select(self, waiting: deque[GenerationJob], running: list[Sample], now: float) -> list[int]:
        """Positions in ``waiting`` (ascending) of the jobs that join now: the head's ``admit`` jobs, unless the
        policy backfills."""
        return list(range(self.admit(waiting, running, now)))

    def wakeup(self, waiting: deque[GenerationJob], running: list[Sample], now: float) -> float | None:
        """When nothing was admitted: the monotonic time at which ``admit`` may say otherwise (None = on arrival)."""
        return None


class ContinuousPolicy(Policy):
    name = "continuous"

    def admit(self, waiting, running, now):
        return max(0, min(len(waiting), self.max_batch - len(running)))


class AdaptivePolicy(ContinuousPolicy):
    """Step-level continuous batching that admits a waiting job only when that is worth it on this device.

    Joining the denoise set now, job j (n_j steps) delays every running sample by what it adds to each shared tick,
    and runs at the shared tick's pace itself; waiting, j starts when the running set has drained (R ticks) and then
    runs at its own pace, but the device loses what batching would have saved (T_set + T_j - T_with per shared tick),
    which every job queued behind j pays too. With tick times from the learnt ``ForwardCost`` (one forward per length
    group, as the engine runs them), j is admitted when the summed completion time of the jobs concerned is lower:

        admit:  shared * T_with + (n_j - shared) * T_j + (sum_i min(n_j, r_i) + ahead * shared) * (T_with - T_set)
        wait:   R * T_set + n_j * T_j + behind * shared * (T_set + T_j - T_with),    shared = min(n_j, R)

    ``behind`` counts the jobs queued after j now and those expected to arrive while the device stays busy (every
    one of them starts earlier by what batching saves): lambda * B / (1 - rho), with lambda the arrival rate of the
    last ``HORIZON_S`` seconds, B the predicted seconds of work in the set and the queue, rho = lambda x the mean
    job's seconds alone (at most 0.9). Jobs are considered in arrival order. A job refused stays at the head; later
    jobs may still join when they finish before the set drains (n_k <= R, backfilling: they never push back the
    refused jobs' start, only slow their wait by T_with - T_set per tick, the ``ahead`` term), which is how
    same-length jobs deep in a queue batch under overload. Where batching is nearly free (a GPU) this admits
    everything, like ``continuous``; where a forward's cost grows with its batch (a CPU) it runs the first jobs alone
    at full speed, like ``none``, until the queue behind makes batching's throughput worth it. Until the cost model
    has seen two forward sizes it admits like ``continuous``."""

    name = "adaptive"
    prices_batching = True
    WINDOW = 64  # queued jobs considered per tick
    HORIZON_S = 10.0  # arrival-rate window
    MAX_LOAD = 0.9  # cap on the utilisation estimate in the busy-period factor 1 / (1 - rho)

    def __init__(self, max_batch: int, max_queue_delay_s: float = 0.0,
                 frames_of: Callable[[float], int] | None = None, max_padding: float = 0.25,
                 cost: ForwardCost | None = None):
        super().__init__(max_batch, max_queue_delay_s)
        self.frames_of = frames_of
        self.max_padding = max_padding
        self.cost = cost if cost is not None else ForwardCost()  # the engine's, which it feeds every forward
        self._arrivals: deque[float] = deque()
        self._last_arrival = -math.inf

    def arrival_rate(self, waiting: deque[GenerationJob], now: float) -> float:
        """Jobs per second over the last ``HORIZON_S`` seconds (every job passes through ``waiting``)."""
        for job in waiting:
            if job.arrival > self._last_arrival:
                self._arrivals.append(job.arrival)
                self._last_arrival = job.arrival
        while self._arrivals and self._arrivals[0] < now - self.HORIZON_S:
            self._arrivals.popleft()
        if len(self._arrivals) < 2:
            return 0.0
        return len(self._arrivals) / max(now - self._arrivals[0], 1e-3)

    def busy_arrivals(self, waiting: deque[GenerationJob], active: list[tuple[int, int]], now: float) -> float:
        """Jobs expected to arrive before the device next goes idle: lambda * B / (1 - rho)."""
        rate = self.arrival_rate(waiting, now)
        if rate == 0.0:
            return 0.0
        alone = [job.steps * self.tick_seconds([self.frames_of(job.duration)])
                 for job in itertools.islice(waiting, self.WINDOW)]
        backlog = sum(alone) + (max(r for _, r in active) * self.tick_seconds([f for f, _ in active]) if active else 0)
        typical = sum(alone) / len(alone) if alone else backlog
        load = min(rate * typical, self.MAX_LOAD)
        return rate * backlog / (1 - load)

    def tick_seconds(self, frames: list[int]) -> float:
        """Predicted seconds of one tick over samples of these lengths (one forward per length group)."""
        return sum(self.cost.seconds(len(g), max(frames[i] for i in g))
                   for g in length_groups(frames, self.max_padding))

    def worth_admitting(self, active: list[tuple[int, int]], frames: int, steps: int, behind: float,
                        ahead: int = 0) -> bool:
        """``active``: (frames, remaining steps) of the samples in the set; the candidate has ``frames`` and
        ``steps``, with ``behind`` jobs queued after it and ``ahead`` refused jobs queued before it."""
        if not active:
            return True
        lengths = [f for f, _ in active]
        t_set, t_with, t_alone = (self.tick_seconds(lengths), self.tick_seconds(lengths + [frames]),
                                  self.tick_seconds([frames]))
        drain = max(r for _, r in active)
        shared = min(steps, drain)
        admit = (shared * t_with + (steps - shared) * t_alone
                 + (sum(min(steps, r) for _, r in active) + ahead * shared) * (t_with - t_set))
        wait = drain * t_set + steps * t_alone + behind * shared * max(0.0, t_set + t_alone - t_with)
        return admit < wait

    def select(self, waiting, running, now):
        room = self.admit(waiting, running, now)  # continuous batching's room: the most that may join
        if not self.cost.known or self.frames_of is None:
            return list(range(room))
        if room == 0:  # a full set: nothing to price, only arrivals to count
            self.arrival_rate(waiting, now)
            return []
        active = [(s.frames, s.remaining) for s in running]
        expected = self.busy_arrivals(waiting, active, now)
        chosen: list[int] = []
        refused = 0
        for k in range(min(len(waiting), self.WINDOW)):
            if len(chosen) == room:
                break
            job = waiting[k]
            if refused and job.steps > max(r for _, r in active):
                continue  # would outlast the set and push back the refused jobs' start
            frames = self.frames_of(job.duration)
            if self.worth_admitting(active, frames, job.steps, len(waiting) - k - 1 + expected, refused):
                chosen.append(k)
                active.append((frames, job.steps))
            else:
                refused += 1
        return chosen


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


POLICIES = {p.name: p for p in (ContinuousPolicy, AdaptivePolicy, RequestLevelPolicy, NoBatchingPolicy)}


def make_policy(name: str, max_batch: int, max_queue_delay_ms: float = 0.0,
                frames_of: Callable[[float], int] | None = None, max_padding: float = 0.25,
                cost: ForwardCost | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
    if name == "adaptive":
        return AdaptivePolicy(max_batch, max_queue_delay_ms / 1000.0, frames_of, max_padding, cost)
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
    admitted: list[GenerationJob]  # left the queue: the engine encodes them, then ``start``s their samples
    dropped: list[GenerationJob]  # cancelled or past their deadline, already resolved with that error


class ModelScheduler:
    """Owns the state of one model's requests: the waiting FIFO, the running set (the denoise set's samples) and
    every job's ``JobState``. It decides (``schedule``: who leaves, who joins); the engine executes and reports each
    outcome back (``start``, ``finish``, ``complete``, ``fail``), and only the scheduler changes the lists.
    ``enqueue`` and ``depth`` may be called from any thread; everything else from the engine's worker thread.
    Different models never share a forward pass; the engine ticks each model's scheduler in turn."""

    def __init__(self, model: str, policy: Policy):
        self.model = model
        self.policy = policy
        self._lock = threading.Lock()
        self._waiting: deque[GenerationJob] = deque()
        self._running: list[Sample] = []

    @property
    def waiting(self) -> tuple[GenerationJob, ...]:
        with self._lock:
            return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sample, ...]:
        return tuple(self._running)

    def depth(self) -> int:
        """Jobs waiting for admission."""
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def enqueue(self, job: GenerationJob) -> None:
        with self._lock:
            job.state = JobState.WAITING
            self._waiting.append(job)

    def schedule(self, now: float) -> SchedulerOutput:
        """Drop the cancelled and the expired (waiting or running; each is resolved with its error here), then
        admit what the policy selects. ``now``: the monotonic clock, or a test's."""
        def verdict(job: GenerationJob) -> EngineError | None:
            if job.cancel_reason == "timeout" or now >= job.deadline:
                return DeadlineExceeded(f"request {job.id} passed its deadline")
            if job.cancel_reason is not None:
                return Cancelled(f"request {job.id} was cancelled ({job.cancel_reason})")
            return None

        dropped: list[tuple[GenerationJob, EngineError]] = []
        with self._lock:
            keep: deque[GenerationJob] = deque()
            for job in self._waiting:
                if (err := verdict(job)) is not None:
                    dropped.append((job, err))
                else:
                    keep.append(job)
            running = []
            for s in self._running:
                if (err := verdict(s.job)) is not None:
                    dropped.append((s.job, err))
                else:
                    running.append(s)
            self._running = running
            picked = set(self.policy.select(keep, self._running, now))
            admitted = [job for i, job in enumerate(keep) if i in picked]
            self._waiting = deque(job for i, job in enumerate(keep) if i not in picked) if picked else keep
        for job in admitted:
            job.state = JobState.RUNNING
        for job, err in dropped:
            job.resolve(None, err)
        return SchedulerOutput(admitted, [job for job, _ in dropped])

    def start(self, samples: list[Sample]) -> None:
        """Admitted jobs whose samples were encoded join the denoise set."""
        self._running.extend(samples)

    def withdraw(self, jobs: list[GenerationJob]) -> None:
        """These jobs' samples leave the denoise set without an outcome (``fail`` gives them one; otherwise they
        start again by another path)."""
        ids = {id(j) for j in jobs}
        self._running = [s for s in self._running if id(s.job) not in ids]

    def finish(self) -> list[Sample]:
        """The samples that took their last step leave the denoise set (for the decode stage)."""
        done = [s for s in self._running if s.finished]
        if done:
            self._running = [s for s in self._running if not s.finished]
        return done

    def complete(self, sample: Sample, result) -> None:
        """A sample's audio is ready."""
        sample.job.resolve(result, None)

    def fail(self, jobs: list[GenerationJob], error: EngineError) -> None:
        """These jobs end with ``error`` (a stage raised for their batch); their samples leave the denoise set."""
        self.withdraw(jobs)
        for job in jobs:
            job.resolve(None, error)

    def drain(self, error: EngineError) -> int:
        """Every waiting and running job ends with ``error`` (shutdown); returns how many there were."""
        with self._lock:
            jobs = list(self._waiting) + [s.job for s in self._running]
            self._waiting, self._running = deque(), []
        for job in jobs:
            job.resolve(None, error)
        return len(jobs)

    def wakeup(self, now: float) -> float | None:
        with self._lock:
            return self.policy.wakeup(self._waiting, self._running, now)
