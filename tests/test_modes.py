"""Generation modes in the pipeline: audio-to-audio, inpainting / outpainting and negative prompts, on the embedded
default model and on the tiny service models, alone and batched with plain requests."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from conftest import float32_default
from service_support import TINY, TINY_ARC

from models.audio.spectral import stft
from models.bundle import ModelBundle
from models.pipeline import SampleRequest
from models.registry import ZOO


@pytest.fixture(scope="module")
def arc():
    """The embedded default model."""
    with float32_default():
        return ModelBundle.load(ZOO / "tta-arc")


@pytest.fixture(scope="module")
def init_clip(arc):
    """A clip of the default model's own: 2 s of a 440 Hz tone."""
    with float32_default():
        return arc.pipeline.generate(["a 440 Hz sine tone on the left"], [2.0], [3])[0]


def run(pipeline, *requests: SampleRequest) -> list[torch.Tensor]:
    trajectories = pipeline.start(list(requests))
    pipeline.run(trajectories)
    return [t.z for t in trajectories]


def magnitude(wave: torch.Tensor) -> torch.Tensor:
    return stft(wave, 2048, 512).abs()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_audio_to_audio_at_level_one_is_plain_generation(arc, init_clip):
    p = arc.pipeline
    plain = SampleRequest("rain on a roof", 2.0, 8, 1.0, 11)
    a2a = SampleRequest("rain on a roof", 2.0, 8, 1.0, 11, init_audio=init_clip, init_noise_level=1.0)
    assert torch.equal(run(p, plain)[0], run(p, a2a)[0])
    # side by side in one batch: equal up to float rounding (matrix products may round rows differently)
    together = run(p, plain, a2a)
    assert rel(together[1], together[0]) < 1e-5


def test_audio_to_audio_stays_near_its_init_at_a_low_level_and_moves_away_as_it_rises(arc, init_clip):
    """Measured on the latents (the default model's domain): its codec turns a small pitch-channel difference into
    a large spectral one. At a low level the sample enters the model's own grid late and keeps the clip's latents."""
    p = arc.pipeline
    frames = p.latent_frames(2.0)
    init = p.init_latents(init_clip, frames)
    distance = {}
    for level in (0.2, 0.6, 1.0):
        (out,) = run(p, SampleRequest("white noise", 2.0, 8, 1.0, 5, init_audio=init_clip, init_noise_level=level))
        distance[level] = rel(out, init)
    assert distance[0.2] < 0.3 * distance[1.0] and distance[0.2] < distance[0.6] < distance[1.0], distance
    trajectory = p.start([SampleRequest("x", 2.0, 8, 1.0, 5, init_audio=init_clip, init_noise_level=0.6)])[0]
    assert trajectory.grid[trajectory.index] <= 0.6 < trajectory.grid[trajectory.index - 1]  # entered, not restarted
    assert trajectory.index == 6 and trajectory.steps == 8  # two steps of the model's own 8-step grid are left
    low = p.start([SampleRequest("x", 2.0, 8, 1.0, 5, init_audio=init_clip, init_noise_level=0.01)])[0]
    assert low.index == 7  # below the grid's last time: its last step still runs


def test_audio_to_audio_of_the_teacher_keeps_the_sound_of_its_init():
    """In audio: at a low level the teacher's result is as close to its init clip as the codec's own round trip
    (encode, decode) is; a plain generation is far."""
    p = ModelBundle.load(ZOO / "tta-teacher").pipeline
    clip = p.generate(["a 440 Hz sine tone on the left"], [2.0], [3], steps=20)[0]
    reference = magnitude(clip)
    round_trip = rel(magnitude(p.decode([p.init_latents(clip, p.latent_frames(2.0))], [2.0])[0]), reference)
    distance = {}
    for level in (0.1, 1.0):
        (out,) = run(p, SampleRequest("white noise", 2.0, 20, 2.0, 5, init_audio=clip, init_noise_level=level))
        distance[level] = rel(magnitude(p.decode([out], [2.0])[0]), reference)
    assert distance[0.1] < 1.25 * round_trip and distance[1.0] > 2 * round_trip, (round_trip, distance)
    # a grid compressed into [level, 0] (Stable Audio 3's reference) keeps the full step count
    assert p.sampler.timesteps(8, 0.2)[0] == 0.2 and p.sampler.timesteps(8, 0.2).numel() == 9


def test_inpainting_keeps_the_clip_outside_the_span_and_changes_it_inside(arc, init_clip):
    p = arc.pipeline
    rate = 44100
    (out,) = run(p, SampleRequest("white noise", 2.0, 8, 1.0, 7, init_audio=init_clip, inpaint=(0.8, 1.2)))
    known = p.init_latents(init_clip, out.shape[-1])
    keep = p.keep_mask(SampleRequest("x", 2.0, 8, 1.0, 7, init_audio=init_clip, inpaint=(0.8, 1.2)), out.shape[-1])
    assert torch.equal(out[:, keep], known[:, keep])  # the kept latents are the clip's, exactly
    assert not keep[int(0.8 * rate / p.networks.samples_per_latent) + 1]
    wave = p.decode([out], [2.0])[0]
    round_trip = p.decode([known], [2.0])[0]
    spec, ref = magnitude(wave), magnitude(round_trip)
    frame = lambda s: int(s * rate / 512)  # noqa: E731 - STFT frame of a time
    outside = torch.cat([spec[..., : frame(0.6)], spec[..., frame(1.4):]], -1)
    ref_outside = torch.cat([ref[..., : frame(0.6)], ref[..., frame(1.4):]], -1)
    inside, ref_inside = spec[..., frame(0.85): frame(1.15)], ref[..., frame(0.85): frame(1.15)]
    assert rel(outside, ref_outside) < 0.1, rel(outside, ref_outside)  # the codec's round trip, nothing more
    assert rel(inside, ref_inside) > 0.5, rel(inside, ref_inside)  # the span holds the prompt's noise now


def test_outpainting_extends_a_clip(arc, init_clip):
    """A duration longer than the init clip with the span after it regenerated: the clip's frames are kept."""
    p = arc.pipeline
    request = SampleRequest("a 440 Hz sine tone on the left", 3.0, 8, 1.0, 2, init_audio=init_clip,
                            inpaint=(2.0, 3.0))
    (out,) = run(p, request)
    keep = p.keep_mask(request, out.shape[-1])
    clip_frames = math.ceil(init_clip.shape[-1] / p.networks.samples_per_latent)
    assert keep[: int(2.0 * 44100 / p.networks.samples_per_latent)].all() and not keep[clip_frames:].any()
    assert p.decode([out], [3.0])[0].shape == (2, 3 * 44100)


def test_a_negative_prompt_steers_the_unconditional_row(text_encoder, model_dir):
    """The empty negative prompt is the model's own unconditional condition; another one changes the result."""
    bundle = ModelBundle.load(model_dir / TINY, text_encoder=text_encoder)
    p = bundle.pipeline
    plain, empty, other = run(p, SampleRequest("a bell rings", 1.0, 3, 3.0, 4),
                              SampleRequest("a bell rings", 1.0, 3, 3.0, 4, negative_prompt=""),
                              SampleRequest("a bell rings", 1.0, 3, 3.0, 4, negative_prompt="loud static noise"))
    assert torch.allclose(plain, empty, atol=1e-6)
    assert (other - plain).abs().max() > 1e-3


@pytest.mark.parametrize("model", [TINY, TINY_ARC])
def test_modes_batched_with_plain_requests_give_their_solo_results(runtimes, model):
    """Through the engine: an audio-to-audio, an inpainting and a negative-prompt request share forwards with plain
    requests of other lengths and give what they give alone."""
    from service.engine import Engine
    from service.jobs import GenerationJob
    from service.metrics import Metrics

    rt = runtimes[model]
    clip = rt.bundle.pipeline.generate(["a dog barks"], [1.5], [1])[0]
    guidance = 1.0 if model == TINY_ARC else 2.5
    specs = [dict(prompt="thunder", duration=2.0, steps=4, guidance=guidance, seed=7),
             dict(prompt="a cat meows", duration=1.5, steps=4, guidance=guidance, seed=8, init_audio=clip,
                  init_noise_level=0.5),
             dict(prompt="birds", duration=1.5, steps=3, guidance=guidance, seed=9, init_audio=clip,
                  inpaint=(0.4, 0.9)),
             dict(prompt="wind", duration=1.0, steps=5, guidance=guidance, seed=10)]
    if model == TINY:
        specs.append(dict(prompt="rain", duration=0.5, steps=4, guidance=3.0, seed=11, negative_prompt="a siren"))

    def through_engine(jobs):
        engine = Engine({model: rt}, Metrics(), max_batch=16, max_padding=float("inf"))
        results, done = {}, threading.Event()
        for i, spec in enumerate(jobs):
            def on_done(result, error, i=i):
                results[i] = (result, error)
                if len(results) == len(jobs):
                    done.set()
            engine.submit(GenerationJob(id=f"j{i}", model=model, deadline=time.monotonic() + 60, on_done=on_done,
                                        **spec))
        engine.start()
        try:
            assert done.wait(60)
        finally:
            engine.stop()
        assert all(e is None for _, e in results.values()), results
        return [results[i][0] for i in range(len(jobs))], engine.ticks

    together, ticks = through_engine(specs)
    assert ticks < sum(s["steps"] for s in specs)  # they shared forwards
    for spec, shared in zip(specs, together):
        (alone,), _ = through_engine([spec])
        assert (shared.latents - alone.latents).abs().max() <= 1e-5 * (1 + alone.latents.abs().max()), spec


@pytest.fixture(scope="module")
def runtimes(model_dir):
    from service.runtimes import load_runtime

    with float32_default():
        return {name: load_runtime(model_dir / name, "torch") for name in (TINY, TINY_ARC)}


@pytest.mark.parametrize("request_kw, message", [
    (dict(init_noise_level=0.5), "init_noise_level needs init_audio"),
    (dict(init_audio=torch.zeros(2, 100), init_noise_level=0.0), r"init_noise_level: 0.0 is outside \(0, 1\]"),
    (dict(init_audio=torch.zeros(2, 100), init_noise_level=1.5), "outside"),
    (dict(inpaint=(0.2, 0.4)), "inpainting needs init_audio"),
    (dict(init_audio=torch.zeros(2, 100), inpaint=(0.4, 0.2)), "start < end"),
    (dict(init_audio=torch.zeros(2, 100), inpaint=(0.4, 9.0)), "after the clip's 1.0 s"),
    (dict(init_audio=torch.zeros(1, 100)), "stereo waveform"),
    (dict(negative_prompt="noise"), "negative_prompt needs guidance other than 1"),
])
def test_requests_a_model_cannot_run_are_refused_with_a_reason(text_encoder, model_dir, request_kw, message):
    p = ModelBundle.load(model_dir / TINY, text_encoder=text_encoder).pipeline
    r = SampleRequest("x", 1.0, 2, 1.0, 0, **request_kw)
    with pytest.raises(ValueError, match=message):
        p.start([r])


def test_a_model_with_guidance_as_an_input_has_no_negative_prompt(arc):
    bsa = ModelBundle.load(ZOO / "tta-bsa-25", text_encoder=arc.text_encoder)
    assert bsa.pipeline.modes == ["text-to-audio", "audio-to-audio", "inpainting"]
    assert arc.pipeline.modes == ["text-to-audio", "audio-to-audio", "inpainting", "negative-prompt"]
    with pytest.raises(ValueError, match="does not support negative-prompt"):
        bsa.pipeline.start([SampleRequest("x", 1.0, 2, 2.0, 0, negative_prompt="noise")])
