"""Scheduler and engine behaviour: determinism across batch companions, batching, cancellation, back-pressure,
deadlines, fault isolation and the policies."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from service_support import TINY, TINY_ARC, LiveServer

from models.audio.spectral import stft


# ------------------------------------------------------------------------------------------ engine level
@pytest.fixture(scope="module")
def runtimes(model_dir):
    from conftest import float32_default
    from service.runtimes import load_runtime

    with float32_default():
        return {name: load_runtime(model_dir / name) for name in (TINY, TINY_ARC)}


ONE_FORWARD = float("inf")  # max_padding that keeps every sample of a model in one padded forward


def run_engine(runtimes, jobs: list[dict], policy="continuous", max_batch=16, max_padding=ONE_FORWARD, metrics=None,
               calibrate=False, whole_generation=False):
    """Submit every job before the worker starts, so the first tick admits them all together. By default all
    lengths share one padded forward (what the padding tests need); ``max_padding`` as the service sets it splits
    them by length."""
    from service.engine import Engine
    from service.metrics import Metrics
    from service.jobs import GenerationJob

    engine = Engine(runtimes, metrics or Metrics(), policy=policy, max_batch=max_batch, queue_size=64,
                    max_padding=max_padding, whole_generation=whole_generation)
    results, done = {}, threading.Event()
    lock = threading.Lock()

    def make_cb(jid):
        def cb(result, error):
            with lock:
                results[jid] = (result, error)
                if len(results) == len(jobs):
                    done.set()
        return cb

    for i, spec in enumerate(jobs):
        jid = spec.get("id", f"job{i}")
        engine.submit(GenerationJob(id=jid, on_done=make_cb(jid), deadline=time.monotonic() + 60,
                                    **{k: v for k, v in spec.items() if k != "id"}))
    if calibrate:
        engine.calibrate()
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.stop()
    return results, engine


def spec(model, prompt, duration, steps, guidance, seed, **kw):
    return dict(model=model, prompt=prompt, duration=duration, steps=steps, guidance=guidance, seed=seed, **kw)


def test_whole_generation_runs_a_qualifying_admitted_set_in_one_call(runtimes):
    """Jobs admitted together with one step count and length, nothing else running: one call from start to PCM,
    the same audio as the step-by-step engine (prompts padded to 16 tokens round differently: a few PCM steps);
    a set that does not qualify (two lengths) runs step by step."""
    from models.audio.pcm import pcm16

    jobs = [spec(TINY_ARC, "a cat meows", 1.0, 4, 2.5, 1), spec(TINY_ARC, "thunder and rain", 1.0, 4, 1.0, 2),
            spec(TINY_ARC, "a bell", 1.0, 4, 3.0, 3, negative_prompt="hiss")]
    whole, engine = run_engine(runtimes, jobs, whole_generation=True)
    assert engine.ticks == 1 and engine.runners[TINY_ARC].whole is not None
    assert engine.metrics.whole_generations.labels(TINY_ARC)._value.get() == 1
    stepped, _ = run_engine(runtimes, jobs)
    for jid, (result, error) in whole.items():
        assert error is None and result.steps_done == 4 and result.timings["decode"] == 0.0
        want = stepped[jid][0]
        assert result.wave.shape == want.wave.shape
        assert (pcm16(result.wave).int() - pcm16(want.wave).int()).abs().max() <= 8
        torch.testing.assert_close(result.latents, want.latents, rtol=1e-3, atol=1e-3)

    mixed, engine = run_engine(runtimes, jobs[:2] + [spec(TINY_ARC, "wind", 2.0, 4, 1.0, 4)], whole_generation=True)
    assert all(e is None for _, e in mixed.values()) and engine.ticks == 4


def test_a_failing_whole_generation_leaves_its_jobs_to_the_step_path(runtimes, monkeypatch, caplog):
    """A whole generation that raises (on a GPU: a capture the device refuses) costs its jobs nothing: the step path
    answers them, and whole generations stay off for that model."""
    from models.generation_graph import WholeGeneration

    def refuse(self, requests):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(WholeGeneration, "__call__", refuse)
    jobs = [spec(TINY_ARC, "a cat meows", 1.0, 4, 2.5, 1), spec(TINY_ARC, "thunder", 1.0, 4, 1.0, 2)]
    with caplog.at_level("ERROR", logger="tta.engine"):
        results, engine = run_engine(runtimes, jobs, whole_generation=True)
    assert all(e is None and r.steps_done == 4 for r, e in results.values())
    assert engine.runners[TINY_ARC].whole is None and engine.ticks == 4
    assert "whole generation failed" in caplog.text
    assert engine.metrics.failed_batches.labels(TINY_ARC, "generate")._value.get() == 1
    assert engine.metrics.whole_generations.labels(TINY_ARC)._value.get() == 0


@pytest.mark.parametrize("model", [TINY, TINY_ARC])
def test_engine_latents_equal_bundle_generate_latents(runtimes, model):
    """The service's per-sample recipe (initial noise, per-step noise, per-sample t grid, masking) gives the same
    latents as ModelBundle.generate_latents: bit-identical alone, float-close inside a mixed batch."""
    bundle = runtimes[model].bundle
    target = spec(model, "a cat meows", 1.3, 6, 2.5, 1234, id="target")
    others = [spec(model, "thunder", 3.0, 3, 1.0, 7), spec(model, "a bell rings", 0.5, 9, 4.0, 8),
              spec(model, "wind", 2.2, 6, 0.0, 9), spec(TINY if model == TINY_ARC else TINY_ARC, "birds", 1.0, 5, 3.0, 10)]
    expected = bundle.pipeline.generate_latents(["a cat meows"], [1.3], [1234], steps=6, guidance=2.5)[0]

    alone, _ = run_engine(runtimes, [target])
    result, error = alone["target"]
    assert error is None
    assert torch.equal(result.latents, expected)
    assert result.steps_done == 6

    mixed, engine = run_engine(runtimes, [others[0], target, *others[1:]])
    result, error = mixed["target"]
    assert error is None and all(e is None for _, e in mixed.values())
    assert (result.latents - expected).abs().max() < 1e-4
    companion = others[1]  # same model, other duration / steps / guidance: equals its own reference run
    ref = bundle.pipeline.generate_latents([companion["prompt"]], [companion["duration"]], [companion["seed"]],
                                  steps=companion["steps"], guidance=companion["guidance"])[0]
    assert (mixed["job2"][0].latents - ref).abs().max() < 1e-4
    assert engine.ticks < 6 + 9 + 3 + 6 + 5  # samples of one model shared forwards


def test_engine_companions_match_their_solo_runs(runtimes):
    jobs = [spec(TINY, f"prompt {i}", d, s, g, 100 + i)
            for i, (d, s, g) in enumerate([(0.5, 2, 1.0), (1.0, 4, 3.0), (2.5, 7, 5.0), (4.0, 3, 0.0),
                                           (1.7, 5, 1.5), (0.9, 1, 3.0), (3.3, 6, 2.0), (1.1, 4, 7.0)])]
    together, _ = run_engine(runtimes, jobs)
    for i, j in enumerate(jobs):
        solo, _ = run_engine(runtimes, [j])
        a, b = together[f"job{i}"][0], solo["job0"][0]
        # float tolerance relative to the signal: the random tiny model with guidance up to 7 gives latents of
        # tens, and batch shape changes the order of float reductions
        assert (a.latents - b.latents).abs().max() <= 1e-5 * (1 + b.latents.abs().max())
        # the waves are compared by magnitude spectrum: the codec integrates its pitch channel into oscillator
        # phase, so a 1e-6 latent difference becomes a phase drift that grows along the clip (2 % of the peak
        # sample by the end of a 2.5 s clip on an Intel Xeon, 0.3 % in magnitude spectrum); another job's, seed's
        # or guidance's clip is off by tens of percent
        mag_a, mag_b = stft(a.wave, 2048, 512).abs(), stft(b.wave, 2048, 512).abs()
        assert (mag_a - mag_b).norm() <= 1e-2 * mag_b.norm()
        assert a.wave.shape == (2, round(j["duration"] * 44100))


def test_adaptive_policy_calibrates_and_serves_the_same_audio(runtimes):
    """Calibration leaves each model's cost model fitted from real forwards (two sizes or more, no negative term),
    reported as tta_forward_cost_seconds; the adaptive policy then serves every job with the same latents as
    continuous batching."""
    from service.metrics import Metrics

    jobs = [spec(TINY, f"adaptive {i}", d, s, g, 300 + i)
            for i, (d, s, g) in enumerate([(0.5, 2, 1.0), (2.0, 4, 3.0), (1.0, 3, 0.0), (2.0, 5, 2.0)])]
    reference, _ = run_engine(runtimes, jobs, max_padding=0.25)
    metrics = Metrics()
    results, engine = run_engine(runtimes, jobs, policy="adaptive", max_padding=0.25, calibrate=True, metrics=metrics)
    for name, sched in engine.schedulers.items():
        cost = sched.policy.cost
        overhead, per_frame = cost.fit()
        assert cost.known and overhead >= 0 and per_frame >= 0 and cost.seconds(1, 100) > 0
        assert metrics.forward_cost.labels(name, "overhead")._value.get() == overhead
        assert metrics.forward_cost.labels(name, "per_frame")._value.get() == per_frame
    for jid, (result, error) in results.items():
        assert error is None
        ref = reference[jid][0].latents
        assert (result.latents - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_engine_denoise_fault_fails_its_batch(runtimes):
    from service.runtimes.debug import FaultInjectingRuntime

    rts = {TINY: FaultInjectingRuntime(runtimes[TINY])}
    results, _ = run_engine(rts, [spec(TINY, "fine", 1.0, 3, 3.0, 1), spec(TINY, "[[fail]] bad", 1.0, 3, 3.0, 2)])
    # both were in the failing batch: both fail with a 500-class error, the engine survives
    assert all(err is not None and err.status == 500 for _, err in results.values())


def test_length_groups_bound_the_padding():
    from service.scheduler import length_groups

    assert length_groups([], 0.25) == []
    assert length_groups([40, 40, 40], 0.25) == [[0, 1, 2]]  # equal lengths: one forward
    groups = length_groups([10, 430, 100, 400, 90, 215], 0.25)
    assert sorted(i for g in groups for i in g) == list(range(6))
    frames = [10, 430, 100, 400, 90, 215]
    for g in groups:
        longest = max(frames[i] for i in g)
        assert longest * len(g) <= 1.25 * sum(frames[i] for i in g)
    assert groups == [[1, 3, 5], [2, 4], [0]]  # longest first; 430 x 3 <= 1.25 x 1045, but not 430 x 4
    assert length_groups(frames, float("inf")) == [[1, 3, 5, 2, 4, 0]]


def test_mixed_lengths_run_as_separate_forwards_and_a_fault_stays_in_its_own(runtimes):
    """With the service's max_padding a 0.5 s and a 4 s sample never share a forward: each equals its solo run,
    tta_batch_size sees forwards of one, and a fault injected into the long one's forward spares the short one."""
    from service.metrics import Metrics
    from service.runtimes.debug import FaultInjectingRuntime

    jobs = [spec(TINY, "short", 0.5, 3, 3.0, 1), spec(TINY, "long", 4.0, 3, 3.0, 2)]
    m = Metrics()
    split, _ = run_engine(runtimes, jobs, max_padding=0.25, metrics=m)
    assert m.batch_size.labels(TINY)._sum.get() == 2 * 3  # six forwards of one sample each
    for i, j in enumerate(jobs):
        solo, _ = run_engine(runtimes, [j])
        assert torch.equal(split[f"job{i}"][0].latents, solo["job0"][0].latents)

    rts = {TINY: FaultInjectingRuntime(runtimes[TINY])}
    results, _ = run_engine(rts, [jobs[0], spec(TINY, "[[fail]] long", 4.0, 3, 3.0, 2)], max_padding=0.25)
    assert results["job0"][1] is None and results["job1"][1].status == 500


# ------------------------------------------------------------------------------------------ HTTP level
def post_many(url: str, bodies: list[dict], timeout: float = 60, stagger: float = 0.0) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            async def one(i, b):
                await asyncio.sleep(i * stagger)
                return await c.post("/generate", json=b)
            return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return asyncio.run(go())


def pcm(content: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(content), dtype="int16")[0].astype(np.int32)


def test_same_seed_same_audio_regardless_of_companions(server):
    target = {"prompt": "a door slams", "duration": 1.3, "steps": 6, "guidance": 2.5, "seed": 77}
    with server.client() as c:
        alone1 = c.post("/generate", json=target)
        alone2 = c.post("/generate", json=target)
    assert alone1.status_code == alone2.status_code == 200
    assert alone1.content == alone2.content  # identical bytes under the same load
    # a slow long companion first, so the others join it in the denoise set
    companions = [{"prompt": "[[slow=15]] drone", "duration": 3.0, "steps": 30, "guidance": 3.0, "seed": 1}]
    companions += [{"prompt": f"companion {i}", "duration": d, "steps": s, "guidance": g, "seed": 10 + i}
                   for i, (d, s, g) in enumerate([(0.5, 3, 1.0), (2.0, 9, 4.0), (4.0, 5, 0.0), (1.0, 12, 6.0),
                                                  (2.7, 6, 2.5), (0.8, 2, 3.0)])]
    before = server.metric("tta_batch_size_bucket", model="tiny", le="4.0")
    count_before = server.metric("tta_batch_size_count", model="tiny")
    responses = post_many(server.url, companions[:1] + [target] + companions[1:], stagger=0.01)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    batched = responses[1]
    diff = np.abs(pcm(batched.content) - pcm(alone1.content)).max()
    assert diff <= 2, diff
    # batches of more than 4 samples happened while these ran
    assert server.metric("tta_batch_size_count", model="tiny") - count_before > \
        server.metric("tta_batch_size_bucket", model="tiny", le="4.0") - before


def test_32_concurrent_requests_batch(server):
    count0 = server.metric("tta_batch_size_count", model="tiny")
    le1 = server.metric("tta_batch_size_bucket", model="tiny", le="1.0")
    bodies = [{"prompt": f"concurrent {i % 5}", "duration": 0.5 + (i % 4) * 0.5, "steps": 2 + i % 5, "seed": i,
               "model": TINY} for i in range(32)]
    responses = post_many(server.url, bodies)
    assert [r.status_code for r in responses] == [200] * 32
    for b, r in zip(bodies, responses):
        assert pcm(r.content).shape == (round(b["duration"] * 44100), 2)
    forwards = server.metric("tta_batch_size_count", model="tiny") - count0
    singles = server.metric("tta_batch_size_bucket", model="tiny", le="1.0") - le1
    assert forwards > singles  # some forwards held more than one sample
    assert forwards < sum(b["steps"] for b in bodies)


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_disconnected_client_stops_consuming_steps(server):
    steps0 = server.metric("tta_denoise_steps_total", model="tiny")
    closed0 = server.metric("tta_requests_total", model="tiny", status="499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json={"prompt": "[[slow=100]] long", "steps": 50, "duration": 1.0},
                   timeout=httpx.Timeout(10, read=0.4))
    # the sample leaves at the next tick: nothing is in flight any more, long before 50 * 100 ms (the waits are
    # generous so that a loaded machine does not fail it)
    assert wait_for(lambda: server.metric("tta_inflight_requests", model="tiny") == 0, 3.0)
    assert wait_for(lambda: server.metric("tta_requests_total", model="tiny", status="499") == closed0 + 1, 3.0)
    steps = server.metric("tta_denoise_steps_total", model="tiny") - steps0
    time.sleep(0.3)
    assert server.metric("tta_denoise_steps_total", model="tiny") - steps0 == steps  # no more steps
    assert steps < 50


def test_deadline_is_504_and_the_sample_is_dropped(base_settings):
    """A request admitted in time whose forwards turn out slower than foreseen: 504 when its deadline passes, and its
    sample leaves the batch. (A fresh server: its cost model has seen one forward size, the warm-up's, so admission
    makes no prediction yet and admits it.)"""
    server = LiveServer(base_settings)
    try:
        steps0 = server.metric("tta_denoise_steps_total", model="tiny")
        with server.client() as c:
            r = c.post("/generate", json={"prompt": "[[slow=30]] too slow", "steps": 50, "timeout": 0.3})
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert wait_for(lambda: server.metric("tta_inflight_requests", model="tiny") == 0, 3.0)
        assert server.metric("tta_denoise_steps_total", model="tiny") - steps0 < 50  # dropped, not run to its end
        with server.client() as c:  # still serving
            assert c.post("/generate", json={"prompt": "after timeout", "steps": 2}).status_code == 200
    finally:
        server.stop()


def test_admission_refuses_work_that_cannot_meet_its_deadline(runtimes):
    """With a known cost per forward, a job whose own steps, plus the work queued and running ahead of it, cannot
    fit before its deadline is refused at once (429 deadline_unreachable, with Retry-After), not run to a 504; the
    same job with time enough, or with nothing ahead of it, is admitted."""
    from service.engine import Engine
    from service.jobs import DeadlineUnreachable, GenerationJob
    from service.metrics import Metrics

    engine = Engine({TINY: runtimes[TINY]}, Metrics(), max_batch=4, queue_size=64)  # never started: jobs stay queued
    cost = engine.costs[TINY]
    frames = runtimes[TINY].latent_frames(1.0)
    cost.observe(frames, 0.02 + 0.001 * frames)  # 20 ms per forward + 1 ms per batch x frame
    cost.observe(4 * frames, 0.02 + 0.004 * frames)

    def job(i: int, seconds: float, steps: int = 10) -> GenerationJob:
        return GenerationJob(id=f"j{i}", model=TINY, prompt="rain", duration=1.0, steps=steps, guidance=1.0, seed=i,
                             deadline=time.monotonic() + seconds, on_done=lambda r, e: None)

    alone = 10 * (0.02 + 0.001 * frames)
    assert engine.least_seconds(job(0, 60)) == pytest.approx(alone, rel=1e-3)
    with pytest.raises(DeadlineUnreachable) as refused:
        engine.submit(job(1, 0.5 * alone))
    assert refused.value.status == 429 and refused.value.code == "deadline_unreachable"
    assert refused.value.retry_after >= 1 and "needs at least" in str(refused.value)
    engine.submit(job(2, 1.5 * alone))  # alone, it fits
    for i in range(3, 9):
        engine.submit(job(i, 60, steps=20))
    # six 20-step jobs ahead: each adds its frames to at least 10 of this job's ticks
    ahead = engine.least_seconds(job(9, 60))
    assert ahead == pytest.approx(alone + 7 * 10 * 0.001 * frames, rel=1e-3)
    with pytest.raises(DeadlineUnreachable):
        engine.submit(job(10, 1.5 * alone))
    engine.submit(job(11, 1.5 * ahead))
    engine.submit(job(12, 0.01), force=True)  # the warm-up path skips admission


def test_injected_fault_fails_only_its_batch(server):
    """A denoiser exception fails the batch it is in (500 JSON); another model's batch and later requests are fine.
    An encode-stage fault fails only the newly admitted request, not the running ones it would have joined."""
    bodies = [{"prompt": "[[slow=20]] survivor", "model": TINY_ARC, "steps": 15, "seed": 5},
              {"prompt": "boom [[fail]]", "model": TINY, "steps": 5}]
    survivor, failed = post_many(server.url, bodies, stagger=0.1)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error" and "denoise" in failed.json()["error"]["message"]
    assert survivor.status_code == 200
    bodies = [{"prompt": "[[slow=20]] running", "model": TINY, "steps": 15, "seed": 6},
              {"prompt": "[[fail:encode]] newcomer", "model": TINY, "steps": 3}]
    running, newcomer = post_many(server.url, bodies, stagger=0.1)
    assert newcomer.status_code == 500 and "encode" in newcomer.json()["error"]["message"]
    assert running.status_code == 200
    with server.client() as c:
        assert c.post("/generate", json={"prompt": "after the fault", "steps": 2}).status_code == 200
    assert server.metric("tta_requests_total", model="tiny", status="500") >= 2


def test_full_queue_is_429_with_retry_after(base_settings):
    srv = LiveServer(base_settings.model_copy(update={"queue_size": 2, "policy": "none"}))
    try:
        bodies = [{"prompt": f"[[slow=40]] q{i}", "steps": 5, "seed": i} for i in range(8)]
        responses = post_many(srv.url, bodies, stagger=0.01)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(429) >= 4 and codes.count(200) >= 3 and set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
        assert srv.metric("tta_requests_total", model="tiny", status="429") == codes.count(429)
        assert srv.metric("tta_queue_depth", model="tiny") == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("policy", ["request", "none", "adaptive"])
def test_other_policies_serve_the_same_audio(server, base_settings, policy):
    bodies = [{"prompt": f"policy {i}", "duration": 0.5 + i * 0.4, "steps": 2 + i, "seed": 50 + i,
               "guidance": 1.0 + i} for i in range(4)]
    reference = post_many(server.url, bodies)
    # the request-level policy starts its batch when max_batch (4) jobs wait; its delay is long enough never to fire
    # first, so the batch does not depend on how fast a loaded machine delivers the four requests
    srv = LiveServer(base_settings.model_copy(update={"policy": policy, "max_batch": 4, "max_queue_delay_ms": 30000,
                                                      "warmup": False}))
    try:
        responses = post_many(srv.url, bodies)
        assert [r.status_code for r in responses] == [200] * 4
        for a, b in zip(reference, responses):
            # float tolerance, not bytes: batch layouts round differently (~1e-6 in the latents), and the codec
            # integrates each partial's frequency into its phase, which grows that into up to ~1e-3 of full scale
            # after a few seconds at the upper harmonics; other seeds or prompts differ by thousands of units
            assert np.abs(pcm(a.content) - pcm(b.content)).max() <= 33
        forwards = srv.metric("tta_batch_size_count", model="tiny")
        if policy == "request":  # the four waited for each other and ran as one batch
            assert srv.metric("tta_batch_size_bucket", model="tiny", le="2.0") < forwards
            assert forwards == max(b["steps"] for b in bodies)
        elif policy == "none":
            assert srv.metric("tta_batch_size_bucket", model="tiny", le="1.0") == forwards
            assert forwards == sum(b["steps"] for b in bodies)
    finally:
        srv.stop()
