"""Whole generations as one program (``models.generation_graph``): every step, the decode and the PCM conversion.
On the CPU the program runs eagerly and must give the step-by-step path's audio; the replay's one extra part, loading
new requests into a fixed batch, must step exactly like the requests' own batch. The CUDA capture runs in the GPU
suite (``benchmarks/gpu_suite.sh``)."""
from __future__ import annotations

import pytest
import torch
from conftest import cuda_only, float32_default
from pipeline_support import record_eagerly

from models.audio.pcm import pcm16
from models.bundle import ModelBundle
from models.generation_graph import WholeGeneration
from models.pipeline import DenoiseBatch, SampleRequest, guided_first
from models.registry import ZOO


@pytest.fixture(scope="module")
def arc():
    with float32_default():
        return ModelBundle.load(ZOO / "tta-arc")


def stepwise(pipeline, requests):
    """The step-by-step path's (int16 clips, final latents), its rows in the order a whole generation runs them
    (``guided_first``: a row's position moves float rounding), answered in the order asked."""
    order = guided_first(requests)
    trajectories = pipeline.start([requests[i] for i in order])
    pipeline.run(trajectories)
    waves = pipeline.decode([s.z for s in trajectories], [requests[i].duration for i in order])
    rows = sorted(range(len(order)), key=order.__getitem__)
    return [pcm16(waves[k]) for k in rows], [trajectories[k].z for k in rows]


def snr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    noise = (got.double() - want.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(want.double().pow(2).sum() / noise))


def batch_a():
    return [SampleRequest("a 440 Hz sine tone", 1.0, 8, 1.0, 1),
            SampleRequest("clicks at 120 bpm on the right", 1.0, 8, 3.0, 2, negative_prompt="hiss"),
            SampleRequest("a sawtooth", 0.98, 8, 2.0, 3)]


def batch_b():  # the same key: rows, frames, steps, guided rows; other prompts (token counts), seeds and scales
    return [SampleRequest("a low hum that slowly fades out towards the end", 0.99, 8, 1.0, 7),
            SampleRequest("a chirp", 1.0, 8, 1.5, 8),
            SampleRequest("a bell at 880 Hz", 1.0, 8, 4.0, 9, negative_prompt="a drum loop with heavy reverb")]


def test_a_whole_generation_gives_the_stepwise_audio(arc):
    exact, padded = WholeGeneration(arc.pipeline, token_multiple=1), WholeGeneration(arc.pipeline)
    for requests in (batch_a(), batch_b()):
        want, latents = stepwise(arc.pipeline, requests)
        got = exact(requests)
        for g, w, r in zip(got.pcm, want, requests):
            assert g.dtype == torch.int16 and g.shape == (2, round(r.duration * arc.sample_rate))
            assert torch.equal(g, w)
        assert all(torch.equal(g, w) for g, w in zip(got.latents, latents))
        # prompts padded to a multiple of 16 tokens: each forward differs by float rounding (3e-7 relative), which
        # eight steps and the decoder carry to a few steps of 16-bit PCM
        for g, w in zip(padded(requests).pcm, want):
            assert (g.int() - w.int()).abs().max() <= 8
            assert snr_db(g, w) > 50
        # the guided rows ran first; each answer is still its own request's (as that request alone, to rounding)
        for g, r in zip(got.latents, requests):
            torch.testing.assert_close(g, stepwise(arc.pipeline, [r])[1][0], rtol=1e-4, atol=1e-4)


def test_each_replay_of_a_recorded_generation_answers_its_own_requests(arc):
    """Everything around a CUDA replay, checked on the CPU (``record_eagerly`` reruns the recorded program into the
    same output): the graph's fixed batch starts every replay from the requests' latents, not from those a previous
    run ended at."""
    whole = WholeGeneration(arc.pipeline, token_multiple=1, record=record_eagerly)
    for requests in (batch_a(), batch_a()[::-1], batch_a()):
        want, latents = stepwise(arc.pipeline, requests)
        got = whole(requests)
        assert all(torch.equal(g, w) for g, w in zip(got.pcm, want))
        assert all(torch.equal(g, w) for g, w in zip(got.latents, latents))
    padded = WholeGeneration(arc.pipeline, record=record_eagerly)
    for requests in (batch_a(), batch_b(), batch_a()):
        for g, w in zip(padded(requests).pcm, stepwise(arc.pipeline, requests)[0]):
            assert (g.int() - w.int()).abs().max() <= 8
    # batch_a reversed runs in the same guided-first rows: one graph
    assert whole.graphs.captures == 1 and padded.graphs.captures == 1


def test_a_loaded_fixed_batch_steps_like_the_requests_own_batch(arc):
    p = arc.pipeline
    fixed = DenoiseBatch(p.start(batch_a()))
    p.prime(fixed)
    fixed.pad_tokens(32)
    shapes = [x.shape for x in fixed.state()]
    own, other = DenoiseBatch(p.start(batch_b())), DenoiseBatch(p.start(batch_b()))
    p.prime(other)  # the guided rows' conditioning, built as the first step would
    fixed.load(other)
    assert [x.shape for x in fixed.state()] == shapes  # loaded in place: the fixed tensors keep their shapes
    for _ in range(8):
        p.step(fixed)
        p.step(own)
    torch.testing.assert_close(fixed.z, own.z, rtol=1e-5, atol=1e-5)


def test_load_refuses_a_batch_of_another_shape(arc):
    p = arc.pipeline
    fixed = DenoiseBatch(p.start(batch_a()))
    p.prime(fixed)
    with pytest.raises(ValueError, match="differ in shape"):
        fixed.load(DenoiseBatch(p.start(batch_a())))  # not primed: without its guided rows
    with pytest.raises(ValueError, match="differ in shape"):
        fewer = DenoiseBatch(p.start(batch_a()[:2]))
        p.prime(fewer)
        fixed.load(fewer)
    longer = DenoiseBatch(p.start([SampleRequest(" ".join(["word"] * 40), 1.0, 8, 1.0, 1)] + batch_a()[1:]))
    p.prime(longer)
    with pytest.raises(ValueError, match="does not fit"):
        fixed.load(longer)


def test_which_requests_qualify(arc):
    whole = WholeGeneration(arc.pipeline)
    assert whole.qualifies(batch_a())
    assert not whole.qualifies([])
    assert not whole.qualifies(batch_a()[:2] + [SampleRequest("x", 1.0, 4, 1.0, 1)])  # another step count
    assert not whole.qualifies(batch_a()[:2] + [SampleRequest("x", 2.0, 8, 1.0, 1)])  # another length
    clip = torch.zeros(2, 44100)
    assert not whole.qualifies([SampleRequest("x", 1.0, 8, 1.0, 1, init_audio=clip, init_noise_level=0.5)])
    with pytest.raises(ValueError, match="share steps and length"):
        whole([SampleRequest("x", 1.0, 8, 1.0, 1), SampleRequest("x", 1.0, 4, 1.0, 1)])


def test_a_shape_runs_whole_from_its_nth_sighting(arc):
    eager = WholeGeneration(arc.pipeline)
    assert eager.capture_after == 1 and eager.wants(batch_a())  # off CUDA there is no capture to pay for
    whole = WholeGeneration(arc.pipeline, capture_after=2)  # what a GPU does by default
    assert not whole.wants(batch_a())
    assert not whole.wants(batch_a()[:2])  # another shape: its own count
    assert whole.wants(batch_b())  # batch_a's shape again (rows, frames, steps, guided rows), other prompts
    assert not whole.wants([SampleRequest("x", 1.0, 8, 1.0, 1, init_audio=torch.zeros(2, 44100),
                                          init_noise_level=0.5)] * 3)


@cuda_only("CUDA graph capture needs a CUDA device (GPU suite)")
def test_the_captured_graph_replays_the_stepwise_audio(arc_random):
    with float32_default():
        bundle = ModelBundle.load(arc_random, device="cuda")
    whole = WholeGeneration(bundle.pipeline)
    for requests in (batch_a(), batch_b(), batch_a()):
        got = whole(requests).pcm
        want = stepwise(bundle.pipeline, requests)[0]
        assert all((g.int() - w.int()).abs().max() <= 2 for g, w in zip(got, want))
    assert whole.graphs.captures == 1


@pytest.mark.parametrize("which", ["sao-tiny", "sa3-tiny"])
def test_the_stable_audio_checkpoints_run_whole_as_step_by_step(sao_tiny, tmp_path, which):
    """Their DiTs keep per-request keys and values (``RequestCache``) and their Oobleck decoder runs its inference
    form: a whole generation still equals the step path."""
    from models.checkpoints import load_checkpoint_dir
    from models.checkpoints.sized import write_random_checkpoint

    with float32_default():
        path = sao_tiny
        if which == "sa3-tiny":
            path = tmp_path / "sa3-tiny"
            write_random_checkpoint(path, "sa3-small", scale="tiny", seed=5)
        bundle = load_checkpoint_dir(path)
    d = min(1.0, bundle.config.max_duration)
    requests = [SampleRequest("a dog barks", d, 4, 3.0, 1), SampleRequest("rain on a tin roof at night", d, 4, 1.0, 2)]
    want, latents = stepwise(bundle.pipeline, requests)
    got = WholeGeneration(bundle.pipeline, token_multiple=1)(requests)
    assert all(torch.equal(g, w) for g, w in zip(got.pcm, want))
    assert all(torch.equal(g, w) for g, w in zip(got.latents, latents))


@cuda_only("CUDA graph capture needs a CUDA device (GPU suite)")
def test_the_serving_configuration_captures_whole_generations(sao_tiny):
    """What the GPU suite serves: the torch runtime in bfloat16 with per-forward CUDA graphs (which step aside inside
    the whole capture), a float16 decoder and the text encoder's graphs; replays equal the step path of the same
    runtime up to 16-bit rounding."""
    from models.checkpoints import load_checkpoint_dir
    from models.pipeline import Pipeline
    from service.runtimes import TorchRuntime

    with float32_default():
        rt = TorchRuntime(load_checkpoint_dir(sao_tiny, device="cuda"), precision="bfloat16", cuda_graphs=True,
                          decode_precision="float16")
    pipeline = Pipeline(rt)
    whole = WholeGeneration(pipeline)
    d = min(1.0, rt.config.max_duration)
    for seed in (1, 2):
        requests = [SampleRequest("a dog barks", d, 8, 3.0, seed), SampleRequest("rain", d, 8, 3.0, seed + 10)]
        got = whole(requests).pcm
        want = stepwise(pipeline, requests)[0]
        assert all(snr_db(g, w) > 30 for g, w in zip(got, want))
    assert whole.graphs.captures == 1
