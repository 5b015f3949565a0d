"""A continuous-batching tick as one recorded program (``models.tick_graph``): the forward and the sampler step of a
running batch. Without CUDA the program is recorded by ``record_eagerly`` (it reruns into the same static output),
so these tests check everything around a replay: the keys, what is loaded into a graph's fixed batch and when, the
copy out, and that batches joining and leaving through graphs end where the step path ends. The CUDA capture itself
runs in the GPU suite (``benchmarks/gpu_suite.sh``)."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import cuda_only, float32_default
from pipeline_support import META, EagerReplay, MetaNetworks, record_eagerly

from models.bundle import ModelBundle
from models.pipeline import DenoiseBatch, Pipeline, SampleRequest
from models.registry import ZOO
from models.tick_graph import TickGraphs


@pytest.fixture(scope="module")
def arc():
    with float32_default():
        return ModelBundle.load(ZOO / "tta-arc")


def arrivals(clip: torch.Tensor, second: tuple[str, str] = ("clicks at 120 bpm on the right", "hiss")
             ) -> dict[int, list[SampleRequest]]:
    """Requests by the tick they arrive at. Two waves of the same shape (rows, length, steps, guided rows) with other
    lengths, seeds and scales (and prompts ``second``), so that a second batch object meets the first one's graph;
    between them samples join and leave part-way, with other lengths and step counts, a negative prompt,
    audio-to-audio and inpainting. Then two unguided waves of one shape (the denoiser takes the batch's own frame
    mask), the second with a shorter clip."""
    return {0: [SampleRequest("a 440 Hz sine tone", 1.0, 8, 1.0, 1),
                SampleRequest("clicks at 120 bpm on the right", 1.0, 8, 3.0, 2, negative_prompt="hiss")],
            3: [SampleRequest("a sawtooth", 0.6, 4, 2.0, 3)],
            9: [SampleRequest("a 440 Hz sine tone", 0.6, 8, 1.0, 7),
                SampleRequest(second[0], 1.0, 8, 1.5, 8, negative_prompt=second[1])],
            12: [SampleRequest("a bell", 1.5, 6, 2.0, 9, init_audio=clip, inpaint=(0.5, 1.0)),
                 SampleRequest("rain", 1.5, 6, 1.0, 10, init_audio=clip, init_noise_level=0.6)],
            20: [SampleRequest("a bell", 1.0, 4, 1.0, 11), SampleRequest("wind", 1.0, 4, 1.0, 12)],
            25: [SampleRequest("a bell", 0.6, 4, 1.0, 13), SampleRequest("wind", 1.0, 4, 1.0, 14)]}


def drive(pipeline: Pipeline, arriving: dict[int, list[SampleRequest]], ticks: TickGraphs | None = None):
    """Run the requests as the engine does, one batch object while nobody joins or leaves; returns the final
    latents in arrival order and how many ticks went through a graph."""
    started, running, batch, graphed = [], [], None, 0
    for tick in range(100):
        if tick in arriving:
            new = pipeline.start(arriving[tick])
            started += new
            running += new
        if not running:
            if tick > max(arriving):
                break
            continue
        batch = batch if batch is not None and batch.holds(running) else DenoiseBatch(running)
        if ticks is not None and ticks.step(batch):
            graphed += 1
        else:
            pipeline.step(batch)
        running = [s for s in running if not s.finished]
    assert all(s.finished for s in started)
    return [s.z for s in started], graphed


def run_on_runner(runner, specs: list[tuple[str, float]], order) -> dict[int, torch.Tensor]:
    """Jobs (prompt, guidance) of 1 s and 4 steps, seed = their index in ``specs``, admitted in ``order`` and
    stepped to the end by the engine's runner, one kept batch; their final latents by seed."""
    from service.jobs import GenerationJob

    jobs = [GenerationJob(f"job{i}", "tta-arc", specs[i][0], 1.0, 4, specs[i][1], i, deadline=1e9,
                          on_done=lambda *_: None) for i in order]
    samples = runner.encode(jobs, 0.0)
    while not all(s.finished for s in samples):
        runner.keep([runner.denoise_step(samples)])
    return {s.job.seed: s.trajectory.z for s in samples}


class Watched(TickGraphs):
    """Checks after every tick that no graph's fixed tensors or output were swapped for others: a replay must copy
    into them (a CUDA graph would not see a new tensor; an eager rerun would)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict = {}

    def step(self, batch):
        out = super().step(batch)
        for key, tick in self.graphs.items():
            pointers = [x.data_ptr() for x in tick.fixed.state()] + [tick.out.data_ptr()]
            assert self.seen.setdefault(key, pointers) == pointers
        return out


def test_ticks_through_graphs_end_where_the_step_path_ends(arc):
    clip = 0.1 * torch.randn(2, 44100 * 2, generator=torch.Generator().manual_seed(0))
    want, _ = drive(arc.pipeline, arrivals(clip))
    # nothing padded (tokens, frames) and every shape captured
    ticks = Watched(arc.pipeline, token_multiple=1, frame_multiple=1, capture_after=1, record=record_eagerly)
    got, graphed = drive(arc.pipeline, arrivals(clip), ticks)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert graphed > 10 and ticks.graphs.captures == len(ticks.graphs) >= 3
    # the second wave replayed the graph the first one captured, loaded with its own state
    (two,) = [tick for key, tick in ticks.graphs.items() if key.rows == 2 and key.guided == (False, True)]
    assert two.graph.replays >= 5


def test_prompts_padded_to_the_token_bucket_stay_within_rounding(arc):
    clip = 0.1 * torch.randn(2, 44100 * 2, generator=torch.Generator().manual_seed(0))
    # other token counts, one 16-token bucket; frames padded to multiples of 32 (22 and 33 frames: two buckets)
    other = ("a chirp that rises", "a drum loop with heavy reverb")
    want, _ = drive(arc.pipeline, arrivals(clip, other))
    ticks = Watched(arc.pipeline, capture_after=1, record=record_eagerly)
    got, graphed = drive(arc.pipeline, arrivals(clip, other), ticks)
    assert {key.frames for key, _ in ticks.graphs.items()} == {32, 64}
    assert graphed > 10
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_tick_through_a_graph_never_reads_the_device_back(arc):
    """With the denoiser on PyTorch's meta device (``tests/test_pipeline_device.py``), where a read-back raises: keys,
    loads, copies in and out, and the step's bookkeeping all stay off the device's values."""
    nets = MetaNetworks(arc)
    pipeline = Pipeline(nets)
    ticks = TickGraphs(pipeline, capture_after=1, record=record_eagerly)
    clip = 0.1 * torch.randn(2, 44100 * 2)
    latents, graphed = drive(pipeline, arrivals(clip), ticks)
    assert graphed > 10 and all(z.device == META for z in latents)
    assert all(c["devices"] == {"meta"} for c in nets.calls)


def test_a_key_holds_what_a_graph_fixes(arc):
    ticks = TickGraphs(arc.pipeline, record=record_eagerly)
    clip = 0.1 * torch.randn(2, 44100)
    one = DenoiseBatch(arc.pipeline.start([SampleRequest("a dog", 1.0, 8, 3.0, 1), SampleRequest("x", 0.5, 4, 1.0, 2)]))
    key = ticks.key(one)
    assert one.length == 22 and (key.rows, key.frames, key.width, key.guided, key.tokens, key.inpaints) == \
        (2, 32, 9, (True, False), 16, False)
    two = DenoiseBatch(arc.pipeline.start([SampleRequest("a cat", 1.0, 8, 2.0, 3),
                                           SampleRequest("y", 1.0, 8, 1.0, 4, init_audio=clip, inpaint=(0.2, 0.4))]))
    assert ticks.key(two).inpaints and ticks.key(two).frames == 32
    # a shape is captured once its capture_after-th batch object steps (the ticks of one batch count once); before
    # that the caller steps the batch
    for _ in range(3):
        assert not ticks.step(one)
        arc.pipeline.step(one)
    assert len(ticks.graphs) == 0
    again = DenoiseBatch(one.trajectories)  # the same samples in a new batch (one left and came back, say)
    assert ticks.step(again) and ticks.graphs.captures == 1 and one.trajectories[0].index == 4
    assert ticks.step(one)  # the first batch, too, now replays the graph


def test_a_longer_fixed_batch_takes_a_shorter_batch_masked_and_refuses_a_longer_one(arc):
    p = arc.pipeline
    short = DenoiseBatch(p.start([SampleRequest("a dog", 1.0, 8, 3.0, 1), SampleRequest("x", 0.5, 8, 1.0, 2)]))
    longer = DenoiseBatch(p.start([SampleRequest("a cat", 1.5, 8, 2.0, 3), SampleRequest("y", 1.0, 8, 1.0, 4)]))
    fixed = DenoiseBatch(longer.trajectories, 64)
    assert fixed.length == 64 and not fixed.frame_mask[:, longer.length:].any()
    for b in (short, longer, fixed):
        p.prime(b)
    fixed.load(short)
    n = short.length
    assert torch.equal(fixed.frame_mask[:, :n], short.frame_mask) and not fixed.frame_mask[:, n:].any()
    assert torch.equal(fixed.z[..., :n], short.z) and not fixed.z[..., n:].any() and not fixed.noise[..., n:].any()
    with pytest.raises(ValueError, match="differ in shape"):
        DenoiseBatch(short.trajectories).load(longer)
    with pytest.raises(ValueError, match="cannot hold"):
        DenoiseBatch(longer.trajectories, 10)


def test_tick_graphs_need_a_cuda_device_or_a_recorder(arc):
    with pytest.raises(ValueError, match="CUDA device"):
        TickGraphs(arc.pipeline)


def test_the_runner_steps_through_tick_graphs_and_gives_them_up_when_one_raises(arc, caplog):
    from service.runner import ModelRunner
    from service.runtimes import TorchRuntime

    rt = TorchRuntime(arc)

    def run(runner):
        return list(run_on_runner(runner, [("a 440 Hz tone", 1.0), ("clicks", 3.0)], range(2)).values())

    want = run(ModelRunner(rt))
    runner = ModelRunner(rt)
    runner.ticks = TickGraphs(runner.pipeline, token_multiple=1, capture_after=1, record=record_eagerly)
    for g, w in zip(run(runner), want):  # guided first: the rows swap places, which moves float rounding only
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert runner.ticks.graphs.captures == 1

    def refuse(fn, pool=None, **_):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner.ticks = TickGraphs(runner.pipeline, token_multiple=1, capture_after=1, record=refuse)
    with caplog.at_level(logging.ERROR, logger="tta.engine"):
        got = run(runner)
    assert runner.ticks is None and "tick graph failed" in caplog.text
    for g, w in zip(got, want):  # the plain step from the failed tick on
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_with_tick_graphs_the_runner_puts_guided_samples_first(arc):
    """So that mixed guided and unguided traffic meets a few batch shapes (how many rows are guided), not one per
    order of arrival; the answers stay each sample's own."""
    from service.runner import ModelRunner
    from service.runtimes import TorchRuntime

    rt = TorchRuntime(arc)
    specs = [(f"prompt {i}", g) for i, g in enumerate([1.0, 3.0, 1.0, 2.0])]

    def run(runner, order):
        return run_on_runner(runner, specs, order)

    want = run(ModelRunner(rt), range(4))
    runner = ModelRunner(rt)
    runner.ticks = TickGraphs(runner.pipeline, capture_after=1, record=record_eagerly)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
        got = run(runner, order)
        for seed, z in want.items():
            torch.testing.assert_close(got[seed], z, rtol=1e-4, atol=1e-4)
    assert [key.guided for key, _ in runner.ticks.graphs.items()] == [(True, True, False, False)]


def test_calibration_times_no_capture(arc):
    """The adaptive policy's calibration times forwards for the cost model; it steps one batch per size, which tick
    graphs do not capture (a shape is captured when another batch of it comes)."""
    from service.engine import Engine
    from service.metrics import Metrics
    from service.runtimes import TorchRuntime

    engine = Engine({"tta-arc": TorchRuntime(arc)}, Metrics(), policy="adaptive")
    runner = engine.runners["tta-arc"]
    runner.ticks = TickGraphs(runner.pipeline, record=record_eagerly)
    engine.calibrate(repeats=2)
    assert len(runner.ticks.graphs) == 0 and len(Engine.CALIBRATION) == 3
    assert [n for _, n in runner.ticks.sightings.items()] == [1, 1, 1]  # a batch per shape, counted once


def test_the_engine_serves_through_tick_graphs_and_counts_their_captures(arc):
    from service.engine import Engine
    from service.metrics import Metrics
    from service.runtimes import TorchRuntime

    engine = Engine({"tta-arc": TorchRuntime(arc)}, Metrics(), policy="continuous")
    runner = engine.runners["tta-arc"]
    runner.ticks = TickGraphs(runner.pipeline, record=record_eagerly)
    want = {}
    for seed in (1, 2):
        (s,) = arc.pipeline.start([SampleRequest("a 440 Hz tone", 1.0, 4, 3.0, seed)])
        arc.pipeline.run([s])
        want[seed] = s.z
    engine.start()
    try:
        for seed in (1, 2):  # one after the other: the second replays the first one's graph
            got = engine.generate_sync({"id": f"j{seed}", "model": "tta-arc", "prompt": "a 440 Hz tone",
                                        "duration": 1.0, "steps": 4, "guidance": 3.0, "seed": seed})
            torch.testing.assert_close(got.latents, want[seed], rtol=1e-4, atol=1e-4)
    finally:
        engine.stop()
    assert runner.graph_captures() == {"tick": 1}
    assert engine.metrics.graph_captures.labels("tta-arc", "tick")._value.get() == 1


def test_tick_graphs_are_a_cuda_setting():
    from service.settings import Settings

    with pytest.raises(ValueError, match="needs device cuda"):
        Settings(tick_graphs=True)
    assert Settings(tick_graphs=True, device="cuda").tick_graphs


@cuda_only("CUDA graph capture needs a CUDA device (GPU suite)")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_captured_ticks_replay_the_step_path_without_waiting_for_the_device(precision, arc_random):
    from service.runtimes import TorchRuntime

    with float32_default():
        rt = TorchRuntime(ModelBundle.load(arc_random, device="cuda"), precision=precision,
                          cuda_graphs=precision != "float32")
    pipeline = Pipeline(rt)
    clip = 0.1 * torch.randn(2, 44100 * 2, generator=torch.Generator().manual_seed(0))
    want, _ = drive(pipeline, arrivals(clip))
    ticks = TickGraphs(pipeline, capture_after=1)
    got, graphed = drive(pipeline, arrivals(clip), ticks)
    assert graphed > 10 and ticks.graphs.captures >= 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
    # once captured, a tick of a running batch queues its work without waiting for the device
    (s,) = pipeline.start([SampleRequest("a 440 Hz tone", 1.0, 8, 3.0, 1)])
    batch = DenoiseBatch([s])
    assert ticks.step(batch)  # captured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            assert ticks.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_eager_replay_writes_into_the_recorded_output():
    x = torch.zeros(3)
    graph, out = record_eagerly(lambda: x + 1)
    assert isinstance(graph, EagerReplay) and torch.equal(out, torch.ones(3))
    x.fill_(5)
    graph.replay()
    assert torch.equal(out, torch.full((3,), 6.0)) and graph.replays == 1
