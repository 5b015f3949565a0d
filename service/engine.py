"""The engine: one worker thread per device that turns scheduler decisions into runner calls.

Stages per tick, for each model with work (one model at a time, round-robin, each with its own forward):
1. schedule: drop cancelled / expired samples (a disconnected client's sample leaves here and stops consuming
   steps), admit waiting jobs as the policy allows;
2. encode: ONE batched text-encoder call for the newly admitted jobs (the encoder caches prompt embeddings);
3. denoise: one ``predict_x0`` per length group (see below) over every active sample, each at its own grid
   position (own steps, guidance, seed, duration), then ``sampler.step`` with per-sample t / t_next and per-sample
   noise;
4. decode: samples that took their last step are decoded together (equal lengths share a codec call).

Different durations share a forward by padding latents to the longest sample with a frame mask: the DiT masks
padded frames out of self-attention and zeroes them, and the sampler output is re-masked, so padded frames
contribute nothing and a sample's result equals its solo result up to float rounding (bit-identical under the
same batch composition). Padding costs the padded frames' compute, so a tick splits the denoise set into forwards
of similar length (``length_groups``: padded work within ``max_padding`` of the real work, 25 % by default). On a
CPU, where a forward's cost grows almost linearly with batch x length, one forward over 1-10 s clips padded to
10 s cost about twice the real work and made batching slower than no batching at all (benchmarks/results/
load-tta-arc-mixed*.md); a GPU, where batching is nearly free, wants a large ``max_padding`` (one forward).

An exception inside a stage fails only the samples of that stage's batch (500); the loop carries on.
Metrics are recorded here, at the engine boundary, never inside the runner.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor

from models.bundle import concat_conditioning
from service.costmodel import ForwardCost
from service.metrics import Metrics
from service.runtimes import Runtime
from service.scheduler import (
    BatchFailed,
    EngineError,
    GenerationJob,
    JobResult,
    ModelScheduler,
    QueueFull,
    Sample,
    ShuttingDown,
    length_groups,
    make_policy,
)

log = logging.getLogger("tta.engine")


class DenoiseBatch:
    """The denoise set as batch tensors, built when samples join or leave and reused while the set stays the same.

    Between changes of composition a tick only gathers each sample's (t, t_next) from its own time grid, runs the
    forward and the sampler step on the batch latents: no re-padding of latents, no rebuilding of the frame mask,
    the guidance vector or the concatenated conditioning. Every sample's ``z`` stays a view of its row, so a
    rebuild (or a decode) reads exactly the values the batch holds.
    """

    def __init__(self, samples: list[Sample]):
        self.samples = list(samples)
        frames = [s.frames for s in samples]
        self.length = max(frames)
        self.z = torch.stack([F.pad(s.z, (0, self.length - s.frames)) for s in samples])
        self.frame_mask = torch.arange(self.length)[None] < torch.tensor(frames)[:, None]
        self.keep = self.frame_mask[:, None]
        width = max(s.grid.numel() for s in samples)
        self.grids = torch.stack([F.pad(s.grid, (0, width - s.grid.numel())) for s in samples])
        self.rows = torch.arange(len(samples))
        self.index = torch.tensor([s.index for s in samples])
        self.guidance = torch.tensor([float(s.job.guidance) for s in samples], dtype=torch.float32)
        self.cond = concat_conditioning([s.cond for s in samples])

    def holds(self, samples: list[Sample]) -> bool:
        """True when ``samples`` are exactly this batch's samples, in the same order."""
        return len(samples) == len(self.samples) and all(a is b for a, b in zip(samples, self.samples))

    def times(self) -> tuple[Tensor, Tensor]:
        """This tick's per-sample t and t_next (float32, as ``ModelBundle.generate_latents`` passes them)."""
        return self.grids[self.rows, self.index].float(), self.grids[self.rows, self.index + 1].float()


class ModelRunner:
    """Executes the three stages for one model. No metrics, no policy; its only state is the runtime, the time grids
    and the current ``DenoiseBatch``."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self._grids: dict[int, Tensor] = {}
        self._batches: list[DenoiseBatch] = []  # one per length group of the last tick

    def grid(self, steps: int) -> Tensor:
        if steps not in self._grids:
            self._grids[steps] = self.rt.sampler.timesteps(steps)
        return self._grids[steps]

    @torch.inference_mode()
    def encode(self, jobs: list[GenerationJob], now: float) -> list[Sample]:
        t0 = time.perf_counter()
        cond = self.rt.encode_text([j.prompt for j in jobs], [j.duration for j in jobs])
        samples = []
        for i, job in enumerate(jobs):
            frames = self.rt.latent_frames(job.duration)
            z, gen = self.rt.initial_noise(job.seed, frames)
            samples.append(Sample(job, frames, self.grid(job.steps), z, gen, cond.select([i]), admitted=now))
        elapsed = time.perf_counter() - t0
        for s in samples:
            s.encode_s = elapsed
            s.denoise_start = time.perf_counter()
        return samples

    def batch(self, samples: list[Sample]) -> DenoiseBatch:
        """The batch tensors for this group of samples: the previous tick's when nobody joined or left, else
        rebuilt."""
        for b in self._batches:
            if b.holds(samples):
                return b
        return DenoiseBatch(samples)

    def keep(self, batches: list[DenoiseBatch]) -> None:
        """The batches of this tick, for the next one (the others are freed)."""
        self._batches = batches

    def release(self) -> None:
        """Drop the cached batches (after a failed tick, or when the denoise set empties)."""
        self._batches = []

    @torch.inference_mode()
    def denoise_step(self, samples: list[Sample]) -> DenoiseBatch:
        """One denoiser forward over these samples, then one sampler step each (in place on the samples); returns
        the batch, for ``keep``."""
        b = self.batch(samples)
        t, t_next = b.times()
        x0 = self.rt.predict_x0(b.z, t, b.cond, b.guidance, b.frame_mask).to("cpu", torch.float32)
        noise = None
        if self.rt.sampler.stochastic:
            noise = torch.stack([F.pad(self.rt.step_noise(s.generator, s.frames), (0, b.length - s.frames))
                                 for s in samples])
        b.z = z = self.rt.sampler.step(b.z, x0, t, t_next, noise) * b.keep
        b.index += 1
        for i, s in enumerate(samples):
            s.z = z[i, :, : s.frames]
            s.index += 1
            s.job.steps_done = s.index
            if s.finished:
                s.z = s.z.clone()  # the result must not keep the whole batch tensor alive
                s.denoise_end = time.perf_counter()
        return b

    @torch.inference_mode()
    def decode(self, samples: list[Sample]) -> list[Tensor]:
        return self.rt.decode([s.z for s in samples], [s.job.duration for s in samples])


class Engine:
    """Owns the worker thread, the bounded queue and the per-model schedulers of one device."""

    def __init__(self, runtimes: dict[str, Runtime], metrics: Metrics, policy: str = "continuous",
                 max_batch: int = 16, queue_size: int = 64, max_queue_delay_ms: float = 20.0,
                 max_padding: float = 0.25):
        self.runtimes = runtimes
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_padding = max_padding
        self.queue_size = queue_size
        self.policy_name = policy
        self.runners = {name: ModelRunner(rt) for name, rt in runtimes.items()}
        # every forward's time, per model: tta_forward_cost_seconds for any policy, the price of batching for one
        # that decides with it (adaptive)
        self.costs = {name: ForwardCost() for name in runtimes}
        self.schedulers = {name: ModelScheduler(name, make_policy(policy, max_batch, max_queue_delay_ms,
                                                                   rt.latent_frames, max_padding, self.costs[name]))
                           for name, rt in runtimes.items()}
        self._inbox: queue.SimpleQueue[GenerationJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = {name: 0 for name in runtimes}  # submitted, not yet admitted (admission control)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latency_ema = 1.0  # seconds per request, for Retry-After
        self.ticks = 0

    # ------------------------------------------------------------------ public, any thread
    CALIBRATION = ((1, 1.0), (1, 0.25), (4, 0.25))  # (batch, share of the model's longest duration)

    def calibrate(self, repeats: int = 2) -> None:
        """Before ``start``, for policies that price batching: time denoiser forwards of a few sizes per model
        (``CALIBRATION``; one untimed forward of each size first), so that the cost model knows this device from
        the first request instead of learning it from live traffic."""
        for name, runner in self.runners.items():
            if not self.schedulers[name].policy.prices_batching:
                continue
            cfg = runner.rt.config
            for batch, share in self.CALIBRATION:
                jobs = [GenerationJob(id=f"calibrate-{i}", model=name, prompt="calibration",
                                      duration=max(0.5, share * cfg.max_duration), steps=repeats + 1,
                                      guidance=cfg.default_guidance, seed=i, deadline=math.inf,
                                      on_done=lambda result, error: None) for i in range(batch)]
                samples = runner.encode(jobs, time.monotonic())
                runner.denoise_step(samples)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    runner.denoise_step(samples)
                    self.costs[name].observe(batch * samples[0].frames, time.perf_counter() - t0)
                runner.release()
            self._report_cost(name)

    def _report_cost(self, name: str) -> None:
        overhead, per_frame = self.costs[name].fit()
        self.metrics.forward_cost.labels(name, "overhead").set(overhead)
        self.metrics.forward_cost.labels(name, "per_frame").set(per_frame)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tta-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_depth(self) -> int:
        with self._lock:
            return sum(self._waiting.values())

    def retry_after(self) -> int:
        depth = self.queue_depth()
        return int(min(60, max(1, math.ceil(self._latency_ema * (1 + depth / self.max_batch)))))

    def submit(self, job: GenerationJob, force: bool = False) -> None:
        """Admission control: raises QueueFull when ``queue_size`` jobs already wait (the 429 path); ``force``
        (warm-up) skips the bound."""
        if self._stop.is_set():
            raise ShuttingDown("the engine is shutting down")
        with self._lock:
            if not force and sum(self._waiting.values()) >= self.queue_size:
                full = True
            else:
                full = False
                self._waiting[job.model] += 1
                self.metrics.queue_depth.labels(job.model).set(self._waiting[job.model])
        if full:
            raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later",
                            self.retry_after())
        self._inbox.put(job)

    def generate_sync(self, job_kwargs: dict, timeout: float = 120.0) -> JobResult:
        """Blocking generation through the real path (warm-up, tests)."""
        done = threading.Event()
        box: dict = {}

        def on_done(result, error):
            box["result"], box["error"] = result, error
            done.set()

        job = GenerationJob(on_done=on_done, deadline=time.monotonic() + timeout, **job_kwargs)
        self.submit(job, force=True)
        if not done.wait(timeout + 1):
            job.cancel("timeout")
            raise TimeoutError(f"generation {job.id} did not finish in {timeout} s")
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        order = deque(self.schedulers)
        while not self._stop.is_set():
            self._drain(block_until=None)
            worked = False
            for _ in range(len(order)):
                name = order[0]
                order.rotate(-1)
                sched = self.schedulers[name]
                if sched.has_work():
                    try:
                        worked |= self._tick(name, sched)
                    except Exception as exc:  # noqa: BLE001 - a bug outside the stages: fail this set, keep serving
                        running, sched.running = [s.job for s in sched.running], []
                        self.runners[name].release()
                        self._fail(name, "schedule", running, exc)
                        worked = True
            if self._stop.is_set():
                break
            if not worked:
                now = time.monotonic()
                wakeups = [w for s in self.schedulers.values() if (w := s.wakeup(now)) is not None]
                if any(s.running for s in self.schedulers.values()):
                    continue
                wait = min(wakeups) - now if wakeups else 0.25
                self._drain(block_until=now + max(0.0, min(wait, 0.25)))
        self._fail_everything(ShuttingDown("the engine stopped"))

    def _drain(self, block_until: float | None) -> None:
        """Move submitted jobs into their scheduler's FIFO; optionally block for the first one."""
        while True:
            try:
                if block_until is not None:
                    job = self._inbox.get(timeout=max(0.0, block_until - time.monotonic()))
                    block_until = None
                else:
                    job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            self.schedulers[job.model].waiting.append(job)

    def _leave_queue(self, model: str, n: int) -> None:
        if n:
            with self._lock:
                self._waiting[model] -= n
                self.metrics.queue_depth.labels(model).set(self._waiting[model])

    def _tick(self, name: str, sched: ModelScheduler) -> bool:
        m = self.metrics
        runner = self.runners[name]
        now = time.monotonic()
        out = sched.schedule(now)
        self._leave_queue(name, len(out.admitted) + sum(1 for j, _ in out.dropped if isinstance(j, GenerationJob)))
        for item, err in out.dropped:
            job = item.job if isinstance(item, Sample) else item
            job.resolve(None, err)
        worked = bool(out.dropped)
        if out.admitted:
            worked = True
            for job in out.admitted:
                m.queue_wait.labels(name).observe(now - job.arrival)
            t0 = time.perf_counter()
            try:
                samples = runner.encode(out.admitted, now)
            except Exception as exc:  # noqa: BLE001 - fault isolation: only the newly admitted jobs fail
                self._fail(name, "encode", [j for j in out.admitted], exc)
                samples = []
            else:
                m.stage_duration.labels(name, "encode").observe(time.perf_counter() - t0)
            sched.running.extend(samples)
        m.inflight.labels(name).set(len(sched.running))
        if not sched.running:
            runner.release()
        else:
            worked = True
            running = list(sched.running)
            t0 = time.perf_counter()
            kept, failed = [], set()
            for group in length_groups([s.frames for s in running], self.max_padding):
                batch = [running[i] for i in group]
                t_forward = time.perf_counter()
                try:
                    kept.append(runner.denoise_step(batch))
                    self.costs[name].observe(len(batch) * max(s.frames for s in batch),
                                             time.perf_counter() - t_forward)
                except Exception as exc:  # noqa: BLE001 - fault isolation: this forward's samples fail, the rest go on
                    failed.update(id(s) for s in batch)
                    self._fail(name, "denoise", [s.job for s in batch], exc)
                    continue
                m.batch_size.labels(name).observe(len(batch))
                m.denoise_steps.labels(name).inc(len(batch))
            runner.keep(kept)
            self.ticks += 1
            self._report_cost(name)
            m.stage_duration.labels(name, "denoise").observe(time.perf_counter() - t0)
            if failed:
                sched.running = [s for s in sched.running if id(s) not in failed]
                running = [s for s in running if id(s) not in failed]
                m.inflight.labels(name).set(len(sched.running))
                if not sched.running:
                    runner.release()
                    return True
            finished = [s for s in running if s.finished]
            if finished:
                sched.running = [s for s in sched.running if not s.finished]
                m.inflight.labels(name).set(len(sched.running))
                if not sched.running:
                    runner.release()
                self._decode(name, runner, finished)
        return worked

    def _decode(self, name: str, runner: ModelRunner, finished: list[Sample]) -> None:
        m = self.metrics
        t0 = time.perf_counter()
        try:
            waves = runner.decode(finished)
        except Exception as exc:  # noqa: BLE001 - fault isolation: only this decode batch fails
            self._fail(name, "decode", [s.job for s in finished], exc)
            return
        decode_s = time.perf_counter() - t0
        m.stage_duration.labels(name, "decode").observe(decode_s)
        sr = runner.rt.sample_rate
        for s, wave in zip(finished, waves):
            timings = {"queue": s.admitted - s.job.arrival, "encode": s.encode_s,
                       "denoise": s.denoise_end - s.denoise_start, "decode": decode_s}
            compute = timings["encode"] + timings["denoise"] + decode_s
            m.rtf.labels(name).observe(compute / max(s.job.duration, 1e-6))
            self._latency_ema = 0.8 * self._latency_ema + 0.2 * (time.monotonic() - s.job.arrival)
            s.job.resolve(JobResult(s.z, wave, sr, timings, s.index), None)

    def _fail(self, name: str, stage: str, jobs: list[GenerationJob], exc: BaseException) -> None:
        self.metrics.failed_batches.labels(name, stage).inc()
        log.error("stage %s of model %s failed for %d request(s): %r", stage, name, len(jobs), exc,
                  extra={"request_ids": [j.id for j in jobs]})
        err = BatchFailed(f"{stage} stage failed for this batch: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        for job in jobs:
            job.resolve(None, err)

    def _fail_everything(self, err: EngineError) -> None:
        self._drain(block_until=None)
        for name, sched in self.schedulers.items():
            for job in list(sched.waiting) + [s.job for s in sched.running]:
                job.resolve(None, err)
            self._leave_queue(name, len(sched.waiting))
            sched.waiting.clear()
            sched.running = []
