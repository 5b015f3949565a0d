"""The scheduler on its own, with a clock the test controls: admission order, deadline versus cancellation, the
request lifecycle (every job's state), the request-level policy's wait, and the engine's queue bound."""
from __future__ import annotations

import math

import pytest

from service.jobs import (
    BatchFailed,
    Cancelled,
    DeadlineExceeded,
    GenerationJob,
    JobState,
    QueueFull,
    Sample,
    ShuttingDown,
)
from service.scheduler import ModelScheduler, make_policy


class Outcomes:
    """Collects what each job ended with (``on_done`` is called once per job)."""

    def __init__(self):
        self.ends: dict[str, tuple] = {}

    def job(self, jid: str, arrival: float = 0.0, deadline: float = math.inf, steps: int = 2, duration: float = 1.0,
            model: str = "m") -> GenerationJob:
        def on_done(result, error):
            assert jid not in self.ends, f"{jid} resolved twice"
            self.ends[jid] = (result, error)

        return GenerationJob(id=jid, model=model, prompt=jid, duration=duration, steps=steps, guidance=1.0, seed=0,
                             deadline=deadline, on_done=on_done, arrival=arrival)


def run_step(sched: ModelScheduler) -> None:
    """What the engine's denoise stage reports: every running sample took one step."""
    for s in sched.running:
        s.job.steps_done += 1


def start(sched: ModelScheduler, jobs: list[GenerationJob], now: float) -> None:
    sched.start([Sample(j, frames=10, admitted=now) for j in jobs])


def test_continuous_admits_in_arrival_order_up_to_max_batch_and_frees_slots_as_samples_finish():
    out = Outcomes()
    sched = ModelScheduler("m", make_policy("continuous", max_batch=2))
    jobs = [out.job(f"j{i}", arrival=i, steps=2 if i else 1) for i in range(4)]
    for j in jobs:
        sched.enqueue(j)
    assert [j.state for j in jobs] == [JobState.WAITING] * 4 and sched.depth() == 4

    first = sched.schedule(now=10.0)
    assert first.admitted == jobs[:2] and first.dropped == []
    assert [j.state for j in jobs] == [JobState.RUNNING, JobState.RUNNING, JobState.WAITING, JobState.WAITING]
    start(sched, first.admitted, 10.0)
    assert sched.schedule(now=10.1).admitted == []  # the set is full
    run_step(sched)
    finished = sched.finish()
    assert [s.job for s in finished] == [jobs[0]]  # one step: done after the first tick
    sched.complete(finished[0], "audio")
    assert jobs[0].state is JobState.DONE and out.ends["j0"] == ("audio", None)
    assert sched.schedule(now=10.2).admitted == [jobs[2]]  # the freed slot goes to the oldest waiting job


def test_deadline_and_cancellation_drop_waiting_and_running_jobs_with_their_own_error():
    out = Outcomes()
    sched = ModelScheduler("m", make_policy("continuous", max_batch=1))
    running = out.job("running", deadline=5.0)
    sched.enqueue(running)
    start(sched, sched.schedule(now=0.0).admitted, 0.0)
    cancelled, expired, both, fine = (out.job("cancelled"), out.job("expired", deadline=5.0),
                                      out.job("both", deadline=5.0), out.job("fine"))
    for j in (cancelled, expired, both, fine):
        sched.enqueue(j)
    cancelled.cancel("client disconnected")
    assert sched.schedule(now=4.9).dropped == [cancelled]
    assert isinstance(out.ends["cancelled"][1], Cancelled) and out.ends["cancelled"][1].status == 499
    both.cancel("client disconnected")
    decision = sched.schedule(now=5.0)  # the deadline has come: it wins over a cancellation seen at the same tick
    assert decision.dropped == [expired, both, running]
    for jid in ("expired", "both", "running"):
        assert isinstance(out.ends[jid][1], DeadlineExceeded) and out.ends[jid][1].status == 504
    assert all(j.state is JobState.CANCELLED for j in (cancelled, expired, both, running))
    assert decision.admitted == [fine] and sched.running == ()  # the expired sample left the denoise set


def test_a_failed_batch_ends_only_its_jobs_and_drain_ends_everything():
    out = Outcomes()
    sched = ModelScheduler("m", make_policy("continuous", max_batch=2))
    a, b, c = out.job("a"), out.job("b"), out.job("c")
    for j in (a, b, c):
        sched.enqueue(j)
    start(sched, sched.schedule(now=0.0).admitted, 0.0)
    sched.fail([a], BatchFailed("the denoise stage failed"))
    assert a.state is JobState.FAILED and [s.job for s in sched.running] == [b]
    assert sched.drain(ShuttingDown("stopping")) == 2  # b running, c waiting
    assert b.state is c.state is JobState.FAILED and out.ends["c"][1].status == 503
    assert not sched.has_work()
    assert not b.resolve("late", None)  # a job ends once


def test_request_level_policy_waits_for_a_full_batch_or_the_oldest_jobs_delay():
    out = Outcomes()
    sched = ModelScheduler("m", make_policy("request", max_batch=3, max_queue_delay_ms=50))
    first = out.job("first", arrival=1.0)
    sched.enqueue(first)
    assert sched.wakeup(now=1.01) == pytest.approx(1.05)
    assert sched.schedule(now=1.04).admitted == []
    second = out.job("second", arrival=1.02)
    sched.enqueue(second)
    assert sched.schedule(now=1.05).admitted == [first, second]  # the oldest waited 50 ms
    start(sched, [first, second], 1.05)
    third = out.job("third", arrival=1.06)
    sched.enqueue(third)
    assert sched.schedule(now=2.0).admitted == [] and sched.wakeup(now=2.0) is None  # the batch runs to its end
    for _ in range(2):
        run_step(sched)
    assert len(sched.finish()) == 2
    assert sched.schedule(now=2.1).admitted == [third]


def test_engine_queue_bound_is_429_with_retry_after_and_warm_up_may_pass_it(model_dir):
    from conftest import float32_default

    from service.engine import Engine
    from service.metrics import Metrics
    from service.runtimes import load_runtime

    with float32_default():
        rt = load_runtime(model_dir / "tiny")
    engine = Engine({"tiny": rt}, Metrics(), queue_size=2)  # not started: nothing leaves the queue
    out = Outcomes()
    engine.submit(out.job("a", model="tiny"))
    engine.submit(out.job("b", model="tiny"))
    with pytest.raises(QueueFull) as full:
        engine.submit(out.job("c", model="tiny"))
    assert full.value.status == 429 and full.value.retry_after >= 1
    engine.submit(out.job("warm-up", model="tiny"), force=True)
    assert engine.queue_depth() == 3
    engine.stop()  # never started: every queued job still gets its answer
    assert {jid: err.status for jid, (_, err) in out.ends.items()} == {"a": 503, "b": 503, "warm-up": 503}
    with pytest.raises(ShuttingDown):
        engine.submit(out.job("late", model="tiny"))
