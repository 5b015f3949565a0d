"""The scheduling simulator drives the service's real policies: closed-form cases of its clock."""
import pytest

from benchmarks.policy_sim import DeviceCost, frames_of, run, simulate

COST = DeviceCost(forward_overhead_s=0.01, forward_per_frame_s=1e-4, encode_overhead_s=0.002,
                  encode_per_prompt_s=0.001, decode_per_audio_s=0.005)


def test_a_lone_job_costs_encode_steps_and_decode():
    out = simulate("continuous", COST, [(1.0, 5.0)], steps=8)
    f = frames_of(5.0)
    expected = COST.encode(1) + 8 * COST.forward(1, f) + 5.0 * COST.decode_per_audio_s
    assert out["latencies"] == [pytest.approx(expected)] and out["refused"] == 0


@pytest.mark.parametrize("policy", ["continuous", "request", "adaptive", "none"])
def test_every_policy_serves_every_job(policy):
    arrivals = [(0.05 * k, 1.0 + (k % 3)) for k in range(40)]
    out = simulate(policy, COST, arrivals, steps=4)
    assert len(out["latencies"]) == 40 and min(out["latencies"]) > 0


def test_continuous_batches_simultaneous_jobs_and_none_serves_them_in_turn():
    arrivals = [(0.0, 2.0)] * 4
    f = frames_of(2.0)
    shared = simulate("continuous", COST, arrivals, steps=8)["latencies"]
    # one encode for all four, 8 forwards of the four together, then four decodes in turn
    base = COST.encode(4) + 8 * COST.forward(4, f)
    assert shared == pytest.approx([base + (k + 1) * 2.0 * COST.decode_per_audio_s for k in range(4)])
    alone = simulate("none", COST, arrivals, steps=8)["latencies"]
    one = COST.encode(1) + 8 * COST.forward(1, f) + 2.0 * COST.decode_per_audio_s
    assert alone == pytest.approx([(k + 1) * one for k in range(4)])


def test_request_level_waits_for_its_queue_delay_and_a_full_queue_refuses():
    out = simulate("request", COST, [(0.0, 1.0)], steps=2, max_queue_delay_ms=50.0)
    lone = COST.encode(1) + 2 * COST.forward(1, frames_of(1.0)) + COST.decode_per_audio_s
    assert out["latencies"][0] == pytest.approx(0.05 + lone, abs=1e-6)
    burst = simulate("none", COST, [(0.0, 1.0)] * 10, steps=2, queue_size=3)
    assert burst["refused"] == 10 - 3 and len(burst["latencies"]) == 3


def test_run_pairs_policies_on_the_same_arrivals():
    rows = run(["continuous", "none"], [20.0], COST, seconds=3.0, repeats=4, audio_seconds=(2.0, 2.0), steps=8,
               slo=1.0)
    cont, none = rows
    assert cont["runs"] == none["runs"] == 4
    assert 0.0 <= none["p99_lower_than_continuous"] <= 1.0
    assert none["p99_s"] > cont["p99_s"]  # at this load serving one job at a time pays the overhead every step
