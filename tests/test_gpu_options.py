"""The torch runtime's CUDA graphs for the denoiser (``service.runtimes.cuda_graphs``).

On any machine: padding a batch to a graph's bucket (rows, frames, text tokens) leaves every real row's output as it
was, for the embedded DiT and for a Stable-Audio-shaped checkpoint's; the option is refused without a CUDA device,
and together with torch.compile. On a CUDA machine: replayed graphs give eager's output for fresh inputs of the
same bucket without capturing again, under float32 and bfloat16 autocast, and the runtime serves eager's latents
with guided and unguided requests in one batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cuda_only, float32_default
from training_support import randomise

from models.checkpoints import load_checkpoint_dir
from models.dit import DiT
from models.export.parity import max_rel_error
from service.runtimes import load_runtime
from service.runtimes.cuda_graphs import CudaGraphDenoiser, pad_inputs, row_bucket, use_cuda_graphs
from service.runtimes.torch_runtime import TorchRuntime

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
cuda = cuda_only("CUDA graphs need an NVIDIA GPU; none here")


@pytest.fixture(autouse=True)
def _float32():
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the comparisons below are float32 against float32
    try:
        with float32_default():
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def embedded_dit() -> DiT:
    """The shipped teacher's architecture (rhythm and value conditioners included) with random weights, none zero
    (the zero-initialised output layers would make every output equal)."""
    config = json.loads((ZOO / "tta-teacher" / "config.json").read_text())["denoiser"]
    torch.manual_seed(0)
    dit = DiT.from_config(config)
    randomise(dit, seed=0, scale=0.02)
    return dit.eval()


def dit_inputs(dit: DiT, device: str, b: int = 3, n: int = 37, tokens: int = 9, seed: int = 0) -> tuple:
    """Random inputs of a scheduler's kind: rows of different lengths (frame mask), prompts of different lengths
    (token mask), a number in one prompt (the last two token channels: present, log value)."""
    c = dit.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, tokens, c.text_dim, generator=g)
    text[..., -2:] = 0.0
    text[0, 2, -2:] = torch.tensor([1.0, 0.3])
    token_mask = torch.arange(tokens)[None] < torch.tensor([tokens, tokens - 3, 4][:b] + [tokens] * (b - 3))[:, None]
    frame_mask = torch.arange(n)[None] < torch.tensor([n, n - 11, n - 2][:b] + [n] * (b - 3))[:, None]
    inputs = (torch.randn(b, c.latent_dim, n, generator=g), torch.rand(b, generator=g), text, token_mask,
              torch.randn(b, c.pooled_dim, generator=g), torch.full((b,), n / 21.5), frame_mask)
    return tuple(x.to(device) for x in inputs)


def sao_inputs(bundle, device: str, b: int = 3, n: int = 37) -> tuple:
    g = torch.Generator().manual_seed(1)
    cond = bundle.pipeline.conditioning(["rain on a tin roof", "a dog", "footsteps and a distant train"][:b], [2.0] * b)
    frame_mask = torch.arange(n)[None] < torch.tensor([n, n - 11, n - 2][:b])[:, None]
    inputs = (torch.randn(b, bundle.codec.latent_dim, n, generator=g), torch.rand(b, generator=g), cond.text.tokens,
              cond.text.mask, cond.text.pooled, cond.seconds, frame_mask)
    return tuple(x.to(device) for x in inputs)


def test_row_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 9, 13, 17, 33, 512, 513)] == [1, 2, 4, 8, 12, 16, 24, 48, 512, 640]


@pytest.mark.parametrize("which", ["embedded", "sao"])
def test_padding_to_a_bucket_leaves_the_real_rows_as_they_were(which, sao_tiny):
    if which == "embedded":
        denoiser = embedded_dit()
        inputs = dit_inputs(denoiser, "cpu")
    else:
        bundle = load_checkpoint_dir(sao_tiny)
        denoiser, inputs = bundle.denoiser, sao_inputs(bundle, "cpu")
    b, n, n_tokens = inputs[0].shape[0], inputs[0].shape[2], inputs[2].shape[1]
    with torch.inference_mode():
        want = denoiser(*inputs)
        padded = pad_inputs(*inputs, None, rows=4, frames=48, n_tokens=n_tokens + 7)
        assert padded[0].shape[0] == 4 and padded[0].shape[2] == 48 and padded[2].shape[1] == n_tokens + 7
        assert not padded[6][:, n:].any() and not padded[3][:, n_tokens:].any() and padded[7] is None
        got = denoiser(*padded[:7], guidance=padded[7])
    assert want.abs().mean() > 1e-3  # not a constant output
    assert max_rel_error(got[:b, :, :n], want) <= 1e-5


def test_cuda_graphs_are_refused_without_cuda_or_with_compile(sao_tiny):
    bundle = load_checkpoint_dir(sao_tiny)
    with pytest.raises(ValueError, match="compile or CUDA graphs"):
        TorchRuntime(bundle, compile=True, cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="need a CUDA device.*TTA_DEVICE=cuda"):
            load_runtime(sao_tiny, "torch", cuda_graphs=True)
        with pytest.raises(ValueError, match="need a CUDA device"):
            use_cuda_graphs(bundle)


@cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_replayed_graphs_give_the_eager_output(autocast):
    dit = embedded_dit().cuda()
    graphs = CudaGraphDenoiser(dit, frame_multiple=16)
    tolerance = 1e-4 if autocast is None else 3e-2
    with torch.inference_mode(), torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None,
                                                cache_enabled=False):
        for seed, (b, n) in enumerate([(3, 37), (4, 44), (3, 40), (1, 37), (1, 48)]):
            inputs = dit_inputs(dit, "cuda", b=b, n=n, seed=seed)
            want, got = dit(*inputs), graphs(*inputs)
            assert got.shape == want.shape
            assert max_rel_error(got.float(), want.float()) <= tolerance, (b, n)
    # rows 3 and 4 share the 4-row bucket, 37-48 frames the 48-frame one; a 1-row batch has its own; a full 48-frame
    # row without padding has no mask and its own graph
    assert graphs.graphs.captures == 3 and len(graphs.graphs) == 3


@cuda
def test_the_runtime_serves_the_eager_latents_through_graphs(sao_tiny):
    from service_support import run_jobs

    jobs = [{"prompt": "a dog barks twice", "duration": 1.0, "steps": 3, "guidance": 3.0, "seed": 5},
            {"prompt": "rain on a tin roof", "duration": 0.6, "steps": 2, "guidance": 1.0, "seed": 6},
            {"prompt": "a bell", "duration": 1.3, "steps": 3, "guidance": 1.0, "seed": 7}]
    eager = load_runtime(sao_tiny, "torch", device="cuda")
    graphed = load_runtime(sao_tiny, "torch", device="cuda", cuda_graphs=True)
    assert isinstance(graphed.bundle.denoiser, CudaGraphDenoiser)
    want = run_jobs(eager, jobs)
    for _ in range(2):  # the second pass replays
        for a, b in zip(want, run_jobs(graphed, jobs)):
            assert max_rel_error(b.latents, a.latents) <= 1e-4
    assert graphed.bundle.denoiser.graphs.captures >= 1

