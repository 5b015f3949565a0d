"""The adaptive policy's cost model and admission rule (pure: no model, no engine)."""
from __future__ import annotations

import math
import time
from collections import deque

import pytest

from service.costmodel import ForwardCost
from service.jobs import GenerationJob, Sample
from service.scheduler import AdaptivePolicy, make_policy


def test_cost_model_recovers_overhead_and_per_frame_cost():
    cost = ForwardCost()
    assert not cost.known and cost.fit() == (0.0, 0.0)
    for batch, frames in ((1, 200), (1, 50), (4, 50), (2, 100), (8, 25)):
        for _ in range(3):
            cost.observe(batch * frames, 0.004 + 1e-4 * batch * frames)
    assert cost.known
    overhead, per_frame = cost.fit()
    assert overhead == pytest.approx(0.004, rel=1e-6) and per_frame == pytest.approx(1e-4, rel=1e-6)
    assert cost.seconds(3, 70) == pytest.approx(0.004 + 0.021)


def test_cost_model_one_size_is_all_overhead_and_never_negative():
    cost = ForwardCost()
    for _ in range(5):
        cost.observe(200, 0.05)
    assert not cost.known and cost.fit() == pytest.approx((0.05, 0.0))
    noisy = ForwardCost()  # time proportional to work, measured with a small negative intercept
    noisy.observe(100, 0.009)
    noisy.observe(400, 0.041)
    overhead, per_frame = noisy.fit()
    assert overhead == 0.0 and per_frame == pytest.approx((100 * 0.009 + 400 * 0.041) / (100 ** 2 + 400 ** 2))
    noisy.observe(400, float("nan"))  # a bad timing is ignored
    assert noisy.fit() == (overhead, per_frame)


def test_cost_model_follows_a_slower_device():
    cost = ForwardCost()
    for _ in range(40):
        cost.observe(100, 0.01)
        cost.observe(400, 0.04)
    for _ in range(200):
        cost.observe(100, 0.02)
        cost.observe(400, 0.08)
    assert cost.seconds(1, 400) == pytest.approx(0.08, rel=1e-3)


def _policy(overhead, per_frame, max_batch=16, frames_of=lambda duration: 100):
    policy = AdaptivePolicy(max_batch, frames_of=frames_of, max_padding=0.25)
    for work in (100, 200, 400):  # a cost model that is exactly overhead + per_frame * work
        policy.cost.observe(work, overhead + per_frame * work)
    return policy


def _jobs(n, steps=8, durations=None, arrivals=None):
    """Queued jobs; by default they arrived long ago (outside the arrival-rate window: no arrivals expected)."""
    durations = durations or [5.0] * n
    arrivals = arrivals or [-1e6] * n
    return deque(GenerationJob(id=f"j{i}", model="m", prompt="p", duration=durations[i], steps=steps, guidance=1.0,
                               seed=i, deadline=math.inf, on_done=lambda r, e: None, arrival=arrivals[i])
                 for i in range(n))


def _running(n, remaining, frames=100, steps=8):
    return [Sample(GenerationJob(id=f"r{i}", model="m", prompt="p", duration=5.0, steps=steps, guidance=1.0, seed=i,
                                 deadline=math.inf, on_done=lambda r, e: None, steps_done=steps - remaining),
                   frames=frames, admitted=0.0) for i in range(n)]


def test_cheap_batching_admits_everything():
    """A GPU-like device: a forward costs its overhead whatever the batch."""
    policy = _policy(overhead=0.02, per_frame=1e-7)
    now = time.monotonic()
    assert policy.select(_jobs(5), _running(3, remaining=8), now) == [0, 1, 2, 3, 4]
    assert policy.select(_jobs(20), _running(3, remaining=8), now) == list(range(13))  # max_batch


def test_costly_batching_waits_until_the_queue_pays_for_it():
    """A CPU-like device: overhead 1, per-sample work 10 per tick. One 8-step sample has just started; admitting
    the next one (8 steps, same length) costs 248 summed tick-units against 176 + 8 x (jobs queued behind it)
    when it waits: worth it only with more than 9 behind."""
    policy = _policy(overhead=1.0, per_frame=0.1)
    now = time.monotonic()
    assert policy.select(_jobs(1), _running(1, remaining=8), now) == []
    assert policy.select(_jobs(10), _running(1, remaining=8), now) == []  # 9 behind the head, fewer behind the rest
    assert policy.select(_jobs(11), _running(1, remaining=8), now)[0] == 0  # 10 behind
    assert policy.select(_jobs(3), [], now) == [0]  # an idle device takes the head alone
    assert policy.select(_jobs(3), _running(1, remaining=1), now) == []


def test_backfilling_never_delays_a_refused_head():
    """The head (1 s: its own forward, nothing saved by batching it) is refused; a same-length job deep in a long
    queue joins the running sample's forward (it gains the overhead for everyone behind it) because it finishes
    when the set drains. When it would outlast the set, it waits like the head."""
    policy = _policy(overhead=1.0, per_frame=0.1, frames_of=lambda duration: round(duration * 20))
    now = time.monotonic()
    queue = _jobs(31, durations=[1.0] + [5.0] * 30)
    picked = policy.select(queue, _running(1, remaining=8), now)
    assert 0 not in picked and picked[0] == 1
    assert policy.select(queue, _running(1, remaining=4), now) == []


def test_arrivals_expected_while_busy_count_as_jobs_behind():
    """Two jobs queued, but arriving at 1 per second with 1.76 s of work queued or running: the device stays busy for
    lambda B / (1 - rho) more arrivals, and each of them gains what batching saves, so the head joins the running
    sample's forward although only one job is queued behind it."""
    policy = _policy(overhead=1.0, per_frame=0.1)  # ticks in units: alone 11, two of one length 21
    policy.cost = ForwardCost()
    for work in (100, 200, 400):  # the same shape in seconds / 100: a forward of one 100-frame sample takes 0.11 s
        policy.cost.observe(work, (1.0 + 0.1 * work) / 100)
    now = 1000.0
    queue = _jobs(2, arrivals=[now - 0.5, now - 0.1])
    history = _jobs(9, arrivals=[now - 9.5 + i for i in range(9)])  # one per second before them
    policy.arrival_rate(history, now)
    rate = policy.arrival_rate(queue, now)
    assert rate == pytest.approx(11 / 9.5)
    running = _running(1, remaining=8)
    backlog, typical = 2 * 8 * 0.11 + 8 * 0.11, 8 * 0.11
    expected = policy.busy_arrivals(queue, [(100, 8)], now)
    assert expected == pytest.approx(rate * backlog / (1 - min(rate * typical, 0.9)))
    assert expected > 9
    assert policy.select(queue, running, now)[:1] == [0]
    quiet = _policy(overhead=1.0, per_frame=0.1)
    assert quiet.select(_jobs(2), running, now) == []  # the same queue with no recent arrivals waits


def test_admission_explores_before_it_knows():
    policy = AdaptivePolicy(16, frames_of=lambda duration: 100)
    assert policy.select(_jobs(4), _running(2, remaining=3), time.monotonic()) == [0, 1, 2, 3]  # like continuous
    assert isinstance(make_policy("adaptive", 4, 0.0, lambda d: 10, 0.5), AdaptivePolicy)
    with pytest.raises(ValueError, match="adaptive"):
        make_policy("adaptiv", 4)


def test_every_policy_the_settings_name_exists():
    from typing import get_args

    from service.scheduler import POLICIES
    from service.settings import PolicyName

    assert set(POLICIES) == set(get_args(PolicyName))
    for name in get_args(PolicyName):
        assert make_policy(name, 4).name == name
