"""Regional compilation (``TTA_COMPILE_BLOCKS``, ``service.runtimes.torch_runtime.compile_denoiser_blocks``): each
block of a denoiser's repeated stack is compiled; the blocks trace whole (no graph breaks), one compilation serves
them all, and the compiled forward gives the eager one's predictions."""
from __future__ import annotations

import pytest
import torch
from conftest import cuda_only, float32_default

from service.runtimes import load_runtime
from service.runtimes.torch_runtime import TorchRuntime, compile_denoiser_blocks
from service.settings import Settings


@pytest.fixture(scope="module")
def sa3_tiny(tmp_path_factory):
    from models.checkpoints.sized import write_random_checkpoint

    with float32_default():
        root = tmp_path_factory.mktemp("ckpt") / "sa3-tiny"
        write_random_checkpoint(root, "sa3-small", "tiny", seed=3)
    return root


def predictions(rt, batch: int, seconds: float, ragged: bool = False) -> torch.Tensor:
    """``predict_x0`` on fixed inputs of ``batch`` rows (``ragged``: the last row's second half padding)."""
    from service.runner import ModelRunner

    pipeline = ModelRunner(rt).pipeline
    frames, device = rt.latent_frames(seconds), rt.device
    g = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, rt.latent_dim, frames, generator=g).to(device)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    if ragged:
        mask[-1, frames // 2:] = False
    cond = pipeline.conditioning([f"rain {i}" for i in range(batch)], [seconds] * batch)
    with torch.inference_mode():
        return pipeline.predict_x0(z, torch.full((batch,), 0.4, device=device), cond,
                                   torch.full((batch,), 2.0, device=device), mask.to(device)).cpu()


@pytest.mark.parametrize("model", ["arc_random", "sao_tiny", "sa3_tiny"])
def test_each_denoisers_blocks_trace_whole_and_share_one_compilation(model, request):
    from torch._dynamo.utils import counters

    path = request.getfixturevalue(model)
    with float32_default():
        eager, traced = load_runtime(path, "torch"), load_runtime(path, "torch")
    torch._dynamo.reset()
    counters.clear()
    blocks = compile_denoiser_blocks(traced.bundle, backend="eager")
    assert blocks >= 2
    seconds = min(1.0, eager.config.max_duration)
    for batch, ragged in ((2, True), (3, False)):
        want, got = predictions(eager, batch, seconds, ragged), predictions(traced, batch, seconds, ragged)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # every block, both batch sizes, with and without padding: the blocks share their code and the mask is always
    # passed, so the graphs traced do not grow with the blocks (a second when two sizes that first coincided part:
    # dynamic shapes specialise such an equality until it fails)
    traced_graphs = counters["stats"]["unique_graphs"]
    assert traced_graphs == 1 or (traced_graphs == 2 and blocks > 2), (blocks, dict(counters["stats"]))
    predictions(traced, 4, seconds / 2)  # another batch size and length: no new graph
    assert counters["stats"]["unique_graphs"] == traced_graphs


def test_compiling_the_whole_denoiser_and_its_blocks_is_refused(sao_tiny):
    with pytest.raises(ValueError, match="TTA_COMPILE_BLOCKS"):
        Settings(_env_file=None, torch_compile=True, compile_blocks=True)
    with float32_default(), pytest.raises(ValueError, match="not both"):
        load_runtime(sao_tiny, "torch", compile=True, compile_blocks=True)


@pytest.mark.slow
def test_the_runtime_serves_from_compiled_blocks_as_it_does_eagerly(sao_tiny):
    """The real compiler (Inductor; C++ on the CPU): compiled during prepare, then the eager predictions."""
    with float32_default():
        eager = load_runtime(sao_tiny, "torch")
        rt = load_runtime(sao_tiny, "torch", compile_blocks=True)
    assert isinstance(rt, TorchRuntime) and rt.blocks_compiled >= 2
    rt.prepare()
    seconds = min(1.0, rt.config.max_duration)
    for batch in (1, 2):
        torch.testing.assert_close(predictions(rt, batch, seconds, ragged=batch == 2),
                                   predictions(eager, batch, seconds, ragged=batch == 2), rtol=1e-4, atol=1e-4)


@cuda_only("compiled blocks replayed from CUDA graphs need an NVIDIA GPU; none here")
def test_compiled_blocks_replay_from_cuda_graphs_as_the_eager_forward_runs(sao_tiny):
    """On the GPU (the suite's compile stage): Triton kernels of the compiled blocks, compiled during prepare's
    warm-ups, recorded in the forward's CUDA graphs; the masked path taken by the warm-ups and the captures alike."""
    with float32_default():
        eager = load_runtime(sao_tiny, "torch", device="cuda")
        rt = load_runtime(sao_tiny, "torch", device="cuda", compile_blocks=True, cuda_graphs=True)
    rt.prepare()
    seconds = min(1.0, rt.config.max_duration)
    for batch in (1, 3, 3):  # the second batch of 3 replays the graph the first captured
        torch.testing.assert_close(predictions(rt, batch, seconds, ragged=batch == 3),
                                   predictions(eager, batch, seconds, ragged=batch == 3), rtol=2e-3, atol=2e-3)
    assert rt.graph_captures()["forward"] >= 2
