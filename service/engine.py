"""The engine: one worker thread per device that turns scheduler decisions into runner calls and reports each
outcome back to the scheduler.

Stages per tick, for each model with work (one model at a time, round-robin, each with its own forward):
1. schedule: the scheduler drops cancelled / expired samples (a disconnected client's sample leaves here and stops
   consuming steps) and admits waiting jobs as the policy allows;
2. encode: ONE batched text-encoder call for the newly admitted jobs (the encoder caches prompt embeddings);
3. denoise: one ``Pipeline.step`` per length group (see below) over every active sample, each at its own grid
   position (own steps, guidance, seed, duration);
4. decode: samples that took their last step are decoded together (equal lengths share a codec call).

Different durations share a forward by padding latents to the longest sample with a frame mask: the DiT masks
padded frames out of self-attention and zeroes them, and the sampler output is re-masked, so padded frames
contribute nothing and a sample's result equals its solo result up to float rounding (bit-identical under the
same batch composition). Padding costs the padded frames' compute, so a tick splits the denoise set into forwards
of similar length (``length_groups``: padded work within ``max_padding`` of the real work, 25 % by default). On a
CPU, where a forward's cost grows almost linearly with batch x length, one forward over 1-10 s clips padded to
10 s cost about twice the real work and made batching slower than no batching at all
(docs/experiments.md); a GPU, where batching is nearly free, wants a large ``max_padding`` (one forward).

A running batch stays where its model computes (``Networks.batch_device``): on a GPU a tick queues its forwards and
sampler steps without waiting for them, the first wait being a decode's copy of finished audio to the host. Forward
costs are then timed by device events read at a later tick (``ForwardClock``), never by a synchronisation.

An exception inside a stage fails only the samples of that stage's batch (500, with a message that names the stage
and nothing of the exception: the detail goes to the log with the request ids); the loop carries on. Stage, batch
and queue metrics are recorded here, at the engine boundary, never inside the runner.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque

from models.audio.pcm import PCM16_SCALE
from service.costmodel import ForwardCost
from service.forward_clock import ForwardClock
from service.jobs import (
    BatchFailed,
    DeadlineUnreachable,
    EngineError,
    GenerationJob,
    JobResult,
    QueueFull,
    Sample,
    ShuttingDown,
)
from service.metrics import Metrics
from service.runner import ModelRunner
from service.runtimes import Runtime
from service.scheduler import ModelScheduler, length_groups, make_policy

log = logging.getLogger("tta.engine")


class Engine:
    """Owns the worker thread, the queue bound and the per-model schedulers and runners of one device."""

    IDLE_WAIT_S = 0.25  # longest sleep of an idle worker between looks at the schedulers' wake-up times

    def __init__(self, runtimes: dict[str, Runtime], metrics: Metrics, policy: str = "continuous",
                 max_batch: int = 16, queue_size: int = 64, max_queue_delay_ms: float = 20.0,
                 max_padding: float = 0.25, whole_generation: bool = False, tick_graphs: bool = False):
        self.runtimes = runtimes
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_padding = max_padding
        self.queue_size = queue_size
        self.policy_name = policy
        self.runners = {name: ModelRunner(rt, whole_generation, tick_graphs) for name, rt in runtimes.items()}
        # every forward's time, per model: tta_forward_cost_seconds for any policy, the price of batching for one
        # that decides with it (adaptive)
        self.costs = {name: ForwardCost() for name in runtimes}
        self.clocks = {name: ForwardClock(rt.batch_device) for name, rt in runtimes.items()}
        self._captures: dict[tuple[str, str], int] = {}  # graph captures reported so far, by (model, kind)
        self.schedulers = {name: ModelScheduler(name, make_policy(policy, max_batch, max_queue_delay_ms,
                                                                   rt.latent_frames, max_padding, self.costs[name]))
                           for name, rt in runtimes.items()}
        self._admission = threading.Lock()  # the queue bound is checked and taken atomically
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latency_ema = 1.0  # seconds per request, for Retry-After
        self._heartbeat = time.monotonic()  # the worker's last time round its loop
        self.ticks = 0

    # ------------------------------------------------------------------ before start
    CALIBRATION = ((1, 1.0), (1, 0.25), (4, 0.25))  # (batch, share of the model's longest duration)

    def calibrate(self, repeats: int = 2) -> None:
        """Before ``start``, for policies that price batching: time denoiser forwards of a few sizes per model
        (``CALIBRATION``; one untimed tick of each size first), so that the cost model knows this device from the
        first request instead of learning it from live traffic. Each size's ticks step one kept batch, as live
        traffic's do: tick graphs capture a shape only when another batch of it comes (``models.tick_graph``), so
        none is captured, let alone timed, here."""
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
                runner.keep([runner.denoise_step(samples)])
                clock = self.clocks[name]
                for _ in range(repeats):
                    mark = clock.start()
                    runner.keep([runner.denoise_step(samples)])
                    clock.stop(mark, batch * samples[0].frames)
                for work, seconds in clock.ready(wait=True):
                    self.costs[name].observe(work, seconds)
                runner.release()
            self._report_cost(name)
            self._report_captures(name)

    def _report_captures(self, name: str) -> None:
        """Count the model's new CUDA graph captures (``tta_cuda_graph_captures_total``)."""
        for kind, n in self.runners[name].graph_captures().items():
            seen = self._captures.get((name, kind), 0)
            if n > seen:
                self.metrics.graph_captures.labels(name, kind).inc(n - seen)
                self._captures[name, kind] = n

    def _report_cost(self, name: str) -> None:
        overhead, per_frame = self.costs[name].fit()
        self.metrics.forward_cost.labels(name, "overhead").set(overhead)
        self.metrics.forward_cost.labels(name, "per_frame").set(per_frame)

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tta-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work; the worker finishes its current tick and every job still queued or running ends
        with a 503 (``ShuttingDown``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._fail_everything(ShuttingDown("the service is shutting down; retry on another replica"))

    @property
    def pipelines(self) -> dict:
        """Each model's pipeline (what ``service.gateway.resolve_request`` checks a request against)."""
        return {name: runner.pipeline for name, runner in self.runners.items()}

    def queue_depth(self) -> int:
        return sum(s.depth() for s in self.schedulers.values())

    def cancel(self, job: GenerationJob, reason: str) -> None:
        """The job leaves the queue or its batch at the worker's next tick (woken for it)."""
        job.cancel(reason)
        self._wake.set()

    def position(self, job: GenerationJob) -> int | None:
        """1 for the next job its model admits, 2 for the one after, ...; None once it has left the queue."""
        waiting = self.schedulers[job.model].waiting
        return next((i + 1 for i, j in enumerate(waiting) if j is job), None)

    def busy(self) -> bool:
        """True while any job waits or runs."""
        return any(s.has_work() for s in self.schedulers.values())

    def alive(self, stall_seconds: float) -> bool:
        """The worker runs and came round its loop within ``stall_seconds`` (a tick is one forward per length
        group and a decode: seconds at most on a loaded CPU; a hang shows here)."""
        if self._thread is None:
            return True  # not started yet (loading)
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < stall_seconds

    def retry_after(self) -> int:
        depth = self.queue_depth()
        return int(min(60, max(1, math.ceil(self._latency_ema * (1 + depth / self.max_batch)))))

    # a job is refused when even this share of its predicted minimum time does not fit before its deadline (the
    # prediction is a lower bound from a fitted model; the margin keeps its error from refusing feasible work)
    DEADLINE_MARGIN = 0.8

    def least_seconds(self, job: GenerationJob) -> float | None:
        """A lower bound on the seconds until ``job`` could finish denoising, given its model's running samples and
        the jobs queued ahead of it, from the model's ``ForwardCost`` (None until it has seen two forward sizes):
        its own steps alone, plus the per-frame work of every sample that runs before it or shares its ticks (each
        for at most the job's steps). True under any first-come-first-served policy, whatever it batches: a sample
        ahead either shares the job's ticks, adding its frames to each, or runs before it, costing at least that."""
        cost = self.costs[job.model]
        if not cost.known:
            return None
        overhead, per_frame = cost.fit()
        frames_of = self.runtimes[job.model].latent_frames
        sched = self.schedulers[job.model]
        frames = frames_of(job.duration)
        seconds = job.steps * (overhead + per_frame * frames)
        for s in sched.running:
            seconds += per_frame * s.frames * min(job.steps, s.remaining)
        for other in sched.waiting:
            seconds += per_frame * frames_of(other.duration) * min(job.steps, other.steps)
        return seconds

    def submit(self, job: GenerationJob, force: bool = False) -> None:
        """Admission control: raises QueueFull when ``queue_size`` jobs already wait (the 429 path), or
        ``DeadlineUnreachable`` (429) when the work ahead cannot leave it time to finish before its deadline;
        ``force`` (warm-up) skips both."""
        if self._stop.is_set():
            raise ShuttingDown("the service is shutting down; retry on another replica")
        sched = self.schedulers[job.model]
        with self._admission:
            if not force and self.queue_depth() >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later",
                                self.retry_after())
            least = None if force else self.least_seconds(job)
            left = job.deadline - time.monotonic()
            if least is not None and least * self.DEADLINE_MARGIN > left:
                raise DeadlineUnreachable(
                    f"this request needs at least {least:.2f} s of denoising on model {job.model} with the "
                    f"{sched.depth()} request(s) queued and {len(sched.running)} running, and its deadline leaves "
                    f"{max(left, 0):.2f} s; retry later or allow a longer timeout", self.retry_after())
            sched.enqueue(job)
        self.metrics.queue_depth.labels(job.model).set(sched.depth())
        self._wake.set()

    def generate_sync(self, job_kwargs: dict, timeout: float = 120.0) -> JobResult:
        """Blocking generation through the real path (warm-up, the offline CLI, tests)."""
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
            self._heartbeat = time.monotonic()
            self._wake.clear()  # a submit after this line wakes the wait below at once
            worked = False
            for _ in range(len(order)):
                name = order[0]
                order.rotate(-1)
                sched = self.schedulers[name]
                if sched.has_work():
                    try:
                        worked |= self._tick(name, sched)
                    except Exception as exc:  # noqa: BLE001 - a bug outside the stages: fail this set, keep serving
                        self.runners[name].release()
                        self._fail(name, sched, "schedule", [s.job for s in sched.running], exc)
                        worked = True
                    self._report_captures(name)
            if self._stop.is_set():
                break
            if not worked:
                if any(s.running for s in self.schedulers.values()):
                    continue
                now = time.monotonic()
                wakeups = [w for s in self.schedulers.values() if (w := s.wakeup(now)) is not None]
                wait = min(wakeups) - now if wakeups else self.IDLE_WAIT_S
                self._wake.wait(max(0.0, min(wait, self.IDLE_WAIT_S)))
        self._fail_everything(ShuttingDown("the service is shutting down; retry on another replica"))

    def _tick(self, name: str, sched: ModelScheduler) -> bool:
        m = self.metrics
        runner = self.runners[name]
        now = time.monotonic()
        out = sched.schedule(now)
        m.queue_depth.labels(name).set(sched.depth())
        worked = bool(out.dropped)
        if out.admitted:
            worked = True
            for job in out.admitted:
                m.queue_wait.labels(name).observe(now - job.arrival)
                job.progress("running", queue_s=now - job.arrival)
            if not sched.running and runner.wants_whole(out.admitted) \
                    and self._generate_whole(name, sched, runner, out.admitted, now):
                return True
            t0 = time.perf_counter()
            try:
                samples = runner.encode(out.admitted, now)
            except Exception as exc:  # noqa: BLE001 - fault isolation: only the newly admitted jobs fail
                self._fail(name, sched, "encode", out.admitted, exc)
            else:
                m.stage_duration.labels(name, "encode").observe(time.perf_counter() - t0)
                sched.start(samples)
        running = list(sched.running)
        m.inflight.labels(name).set(len(running))
        if not running:
            runner.release()
            return worked
        t0 = time.perf_counter()
        kept = []
        clock = self.clocks[name]
        for group in length_groups([s.frames for s in running], self.max_padding):
            batch = [running[i] for i in group]
            mark = clock.start()
            try:
                kept.append(runner.denoise_step(batch))
            except Exception as exc:  # noqa: BLE001 - fault isolation: this forward's samples fail, the rest go on
                self._fail(name, sched, "denoise", [s.job for s in batch], exc)
                continue
            clock.stop(mark, len(batch) * max(s.frames for s in batch))
            for s in batch:
                s.job.progress("step", step=s.job.steps_done, steps=s.job.steps)
            m.batch_size.labels(name).observe(len(batch))
            m.denoise_steps.labels(name).inc(len(batch))
        runner.keep(kept)
        for work, seconds in clock.ready():  # forwards the device has finished (all of this tick's on a CPU)
            self.costs[name].observe(work, seconds)
        self.ticks += 1
        self._report_cost(name)
        m.stage_duration.labels(name, "denoise").observe(time.perf_counter() - t0)
        finished = sched.finish()
        m.inflight.labels(name).set(len(sched.running))
        if not sched.running:
            runner.release()
        if finished:
            self._decode(name, sched, runner, finished)
        return True

    def _generate_whole(self, name: str, sched: ModelScheduler, runner: ModelRunner, jobs: list[GenerationJob],
                        now: float) -> bool:
        """Admitted jobs that nothing else runs beside and that share steps and length, from start to PCM in one
        call (a captured graph on a GPU): no tick between their steps, so nothing joins them and a cancellation
        takes effect when they are done. Timings: "denoise" is the whole run, the decode included. If the call
        raises (a capture the device refuses, say), whole generations are turned off for this model, the error is
        logged and counted, and False leaves the jobs to the step path, which answers them as it would have."""
        m = self.metrics
        samples = [Sample(j, runner.rt.latent_frames(j.duration), now) for j in jobs]
        sched.start(samples)
        m.inflight.labels(name).set(len(samples))
        try:
            out = runner.generate_whole(jobs)
        except Exception as exc:  # noqa: BLE001 - the step path takes these jobs instead
            sched.withdraw(jobs)
            runner.whole = None
            m.failed_batches.labels(name, "generate").inc()
            ids = [j.id for j in jobs]
            log.error("whole generation failed for model %s; it runs step by step from now on %s", name, ids,
                      exc_info=(type(exc), exc, exc.__traceback__), extra={"request_ids": ids})
            return False
        m.whole_generations.labels(name).inc()
        m.stage_duration.labels(name, "encode").observe(out.start_s)
        m.stage_duration.labels(name, "denoise").observe(out.run_s)
        m.batch_size.labels(name).observe(len(jobs))
        for job in jobs:
            job.steps_done = job.steps
            m.denoise_steps.labels(name).inc(job.steps)
        self.ticks += 1
        sched.finish()
        m.inflight.labels(name).set(len(sched.running))
        sr = runner.pipeline.sample_rate
        for s, pcm, latents in zip(samples, out.pcm, out.latents):
            s.job.progress("step", step=s.job.steps, steps=s.job.steps)
            # 16-bit PCM as floats: the service's encoders turn it back into the same integers
            self._answer(name, sched, s, JobResult(latents, pcm.float() / PCM16_SCALE, sr, {
                "encode": out.start_s, "denoise": out.run_s, "decode": 0.0}, s.job.steps))
        return True

    def _decode(self, name: str, sched: ModelScheduler, runner: ModelRunner, finished: list[Sample]) -> None:
        m = self.metrics
        for s in finished:
            s.job.progress("decoding")
        runner.settle(finished)
        t0 = time.perf_counter()
        try:
            waves = runner.decode(finished)
        except Exception as exc:  # noqa: BLE001 - fault isolation: only this decode batch fails
            self._fail(name, sched, "decode", [s.job for s in finished], exc)
            return
        decode_s = time.perf_counter() - t0
        m.stage_duration.labels(name, "decode").observe(decode_s)
        sr = runner.pipeline.sample_rate
        for s, wave in zip(finished, waves):
            self._answer(name, sched, s, JobResult(s.trajectory.z.cpu(), wave, sr, {
                "encode": s.encode_s, "denoise": s.denoise_end - s.denoise_start, "decode": decode_s},
                s.job.steps_done))

    def _answer(self, name: str, sched: ModelScheduler, s: Sample, result: JobResult) -> None:
        """A sample's audio is ready: its queue time joins the result's timings (encode, denoise, decode), its
        real-time factor and the latency that Retry-After is estimated from are recorded, and its job resolved."""
        result.timings = {"queue": s.admitted - s.job.arrival, **result.timings}
        compute = result.timings["encode"] + result.timings["denoise"] + result.timings["decode"]
        self.metrics.rtf.labels(name).observe(compute / max(s.job.duration, 1e-6))
        self._latency_ema = 0.8 * self._latency_ema + 0.2 * (time.monotonic() - s.job.arrival)
        sched.complete(s, result)

    def _fail(self, name: str, sched: ModelScheduler, stage: str, jobs: list[GenerationJob],
              exc: BaseException) -> None:
        """A stage raised for these jobs: they fail with a message that names the stage (what a client may see);
        the exception goes to the log with their request ids."""
        self.metrics.failed_batches.labels(name, stage).inc()
        ids = [j.id for j in jobs]
        log.error("stage %s of model %s failed for %d request(s) %s", stage, name, len(jobs), ids,
                  exc_info=(type(exc), exc, exc.__traceback__), extra={"request_ids": ids})
        err = BatchFailed(f"generation failed in the {stage} stage for the batch this request was in; the server "
                          "log has the details")
        err.__cause__ = exc
        sched.fail(jobs, err)
        self.metrics.inflight.labels(name).set(len(sched.running))

    def _fail_everything(self, err: EngineError) -> None:
        for name, sched in self.schedulers.items():
            if sched.drain(err):
                self.runners[name].release()
            self.metrics.queue_depth.labels(name).set(0)
            self.metrics.inflight.labels(name).set(0)
