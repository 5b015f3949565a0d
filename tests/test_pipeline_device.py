"""Device-resident batches: a running batch lives on the backend's device and a step never reads a value back to the
host. Checked on the CPU with the networks on PyTorch's ``meta`` device, where tensors have shapes and devices but no
values: reading one back (``.item()``, ``bool()``, ``.tolist()``, a copy to the CPU) raises, and so does mixing in a
CPU tensor of more than one element. Seeds keep their meaning: every random number is drawn on the CPU when a sample
starts, in the order a draw per step would take them."""
from __future__ import annotations

import pytest
import torch
from conftest import cuda_only, float32_default
from pipeline_support import META, MetaNetworks

from models.bundle import ModelBundle
from models.pipeline import DenoiseBatch, Pipeline, SampleRequest, initial_noise, step_noise
from models.registry import ZOO


@pytest.fixture(scope="module")
def arc():
    with float32_default():
        return ModelBundle.load(ZOO / "tta-arc")


def requests(init_clip: torch.Tensor) -> list[SampleRequest]:
    """A mixed batch: guided and unguided rows, a negative prompt, audio-to-audio, inpainting, three lengths."""
    return [SampleRequest("a 440 Hz sine tone", 1.0, 4, 1.0, 1),
            SampleRequest("clicks at 120 bpm", 2.0, 8, 3.0, 2, negative_prompt="noise"),
            SampleRequest("a sawtooth", 1.5, 6, 2.0, 3, init_audio=init_clip, init_noise_level=0.5),
            SampleRequest("a chirp", 2.0, 8, 2.0, 4, init_audio=init_clip, inpaint=(0.5, 1.0))]


def test_a_step_keeps_the_batch_on_its_device_and_never_reads_it_back(arc):
    nets = MetaNetworks(arc)
    pipeline = Pipeline(nets)
    clip = 0.1 * torch.randn(2, 44100 * 2)
    trajectories = pipeline.start(requests(clip))
    assert all(s.z.device == META and s.noise.device == META for s in trajectories)
    assert trajectories[3].known.device == META and trajectories[3].keep.device == META
    assert trajectories[0].cond.seconds.device.type == "cpu"  # per-request conditioning stays on the host
    pipeline.run(trajectories)  # joins and leaves as samples finish; any read-back raises on meta
    assert all(s.finished for s in trajectories)
    assert all(s.z.device == META and s.z.shape == (arc.latent_dim, s.frames) for s in trajectories)
    assert all(c["devices"] == {"meta"} for c in nets.calls)
    # guided rows (three of four guided) share the conditional rows' forward
    assert nets.calls[0]["rows"] == 4 + 3


def test_each_steps_noise_is_drawn_at_start_in_the_order_a_draw_per_step_takes(arc):
    pipeline = arc.pipeline
    clip = 0.1 * torch.randn(2, 44100)
    plain, a2a = pipeline.start([SampleRequest("x", 1.0, 5, 1.0, 11),
                                 SampleRequest("y", 1.0, 8, 1.0, 12, init_audio=clip, init_noise_level=0.4)])
    frames, dim = plain.frames, arc.latent_dim
    z, g = initial_noise(dim, 11, frames)
    assert torch.equal(plain.z, z)
    assert torch.equal(plain.noise, torch.stack([step_noise(g, dim, frames) for _ in range(5)]))
    _, g = initial_noise(dim, 12, frames)
    assert a2a.index > 0  # it enters its grid part-way: no noise is drawn for the steps it skips
    assert torch.equal(a2a.noise[: a2a.index], torch.zeros(a2a.index, dim, frames))
    assert torch.equal(a2a.noise[a2a.index:], torch.stack([step_noise(g, dim, frames)
                                                             for _ in range(a2a.steps - a2a.index)]))


def test_a_batch_gathers_each_samples_own_noise_for_its_own_step(arc):
    a, b = arc.pipeline.start([SampleRequest("x", 1.0, 3, 1.0, 1), SampleRequest("y", 2.0, 8, 1.0, 2)])
    arc.pipeline.step(DenoiseBatch([b]))
    batch = DenoiseBatch([a, b])
    noise = batch.step_noise()
    assert torch.equal(noise[0, :, : a.frames], a.noise[0]) and not noise[0, :, a.frames:].any()
    assert torch.equal(noise[1], b.noise[1])
    assert batch.memo["guided_rows"] == []


def test_the_deterministic_teacher_draws_no_step_noise():
    with float32_default():
        teacher = ModelBundle.load(ZOO / "tta-teacher")
    (s,) = teacher.pipeline.start([SampleRequest("x", 0.5, 2, 1.0, 1)])
    assert s.noise is None and DenoiseBatch([s]).step_noise() is None


@cuda_only()
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_on_cuda_the_steps_after_a_batch_forms_never_wait_for_the_device(cuda_graphs, arc_random):
    """torch's sync debug mode raises on any operation that makes the host wait for the GPU (a read-back, a
    non-pinned copy); the first step may (it builds the batch's guided rows and meets a new frame mask)."""
    from service.runtimes import TorchRuntime

    with float32_default():
        rt = TorchRuntime(ModelBundle.load(arc_random, device="cuda"), precision="bfloat16",
                          cuda_graphs=cuda_graphs)
    pipeline = Pipeline(rt)
    trajectories = pipeline.start([SampleRequest("a 440 Hz sine tone", 2.0, 8, 1.0, 1),
                                   SampleRequest("clicks", 1.5, 8, 3.0, 2, negative_prompt="hiss")])
    assert all(s.z.is_cuda and s.noise.is_cuda for s in trajectories)
    batch = DenoiseBatch(trajectories)
    pipeline.step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            pipeline.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pipeline.step(batch)
    assert all(s.finished for s in trajectories)
