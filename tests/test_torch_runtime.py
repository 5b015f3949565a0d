"""The torch runtime's options: ``compile`` (torch.compile of the denoiser, dynamic shapes) serves the same latents as
eager PyTorch for batches of mixed lengths and guidance, and ``precision`` autocasts the denoiser (bfloat16 stays
close to float32 without being float32); both reach the runtime from the service settings."""
from __future__ import annotations

import pytest
import torch
from conftest import float32_default
from service_support import TINY, run_jobs

from models.export.parity import max_rel_error
from service.runtimes import load_runtime

JOBS = [{"prompt": "a dog barks twice", "duration": 1.0, "steps": 3, "guidance": 3.0, "seed": 5},
        {"prompt": "rain on a tin roof", "duration": 0.6, "steps": 2, "guidance": 1.0, "seed": 6},
        {"prompt": "a bell", "duration": 1.3, "steps": 3, "guidance": 1.0, "seed": 7}]


@pytest.fixture(autouse=True)
def _float32():
    with float32_default():
        yield


@pytest.mark.slow
def test_a_compiled_denoiser_serves_the_eager_latents(model_dir):
    eager, compiled = load_runtime(model_dir / TINY, "torch"), load_runtime(model_dir / TINY, "torch", compile=True)
    assert (eager.compiled, compiled.compiled) == (False, True)
    assert compiled.bundle.denoiser is not eager.bundle.denoiser and hasattr(compiled.bundle.denoiser, "_orig_mod")
    from torch._dynamo.utils import counters

    compiled.prepare()  # batch 1 and batch 2 compiled before serving, under inference mode as the engine runs
    graphs = counters["stats"]["unique_graphs"]
    want = run_jobs(eager, JOBS)
    for _ in range(2):
        got = run_jobs(compiled, JOBS)
        for a, b in zip(want, got):
            assert max_rel_error(b.latents, a.latents) <= 1e-4
            assert b.wave.shape == a.wave.shape
    assert counters["stats"]["unique_graphs"] == graphs  # other lengths, batch sizes and guidance: no recompilation


def test_bfloat16_autocast_stays_near_float32(model_dir):
    full = load_runtime(model_dir / TINY, "torch")
    half = load_runtime(model_dir / TINY, "torch", precision="bfloat16")
    for a, b in zip(run_jobs(full, JOBS), run_jobs(half, JOBS)):
        assert b.latents.dtype == torch.float32
        err = max_rel_error(b.latents, a.latents)
        assert 1e-6 < err < 0.1, err  # bfloat16's 8-bit mantissa shows, and stays small
    with pytest.raises(ValueError, match="precision 'float64'"):
        load_runtime(model_dir / TINY, "torch", precision="float64")


@pytest.mark.slow
def test_the_settings_reach_the_torch_runtime_and_not_the_others(model_dir, monkeypatch):
    pytest.importorskip("onnxruntime")
    from service.app import load_model
    from service.settings import Settings

    # as on a CPU with native bfloat16 (AVX-512 or AMX): elsewhere the settings refuse it (test below)
    monkeypatch.setattr("service.runtimes.torch_runtime.cpu_runs_natively", lambda precision: True)
    rt = load_model(model_dir / TINY, Settings(runtime="torch", torch_compile=True, precision="bfloat16"))
    assert (rt.name, rt.compiled, rt.precision) == ("torch", True, "bfloat16")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        load_model(model_dir / TINY, Settings(runtime="torch", device="cpu", cuda_graphs=True))
    assert load_model(model_dir / TINY, Settings(runtime="onnxruntime", torch_compile=True)).name == "onnxruntime"


def test_16_bit_types_a_cpu_lacks_are_refused_by_the_settings_and_named_by_the_runtime(model_dir, monkeypatch,
                                                                                         caplog):
    """Without native 16-bit arithmetic torch emulates it, tens of times slower than float32: the service's settings
    refuse such a precision on the CPU, naming each variable; the runtime itself (the library, benchmarks) runs it
    and says why it is slow. A CPU that has the type, a GPU, or ONNX Runtime (which ignores both settings) passes."""
    from pydantic import ValidationError

    import service.runtimes.torch_runtime as torch_runtime
    from service.settings import Settings

    assert torch_runtime.cpu_runs_natively("float32")
    assert isinstance(torch_runtime.cpu_runs_natively("bfloat16"), bool)
    native = {"float32"}
    monkeypatch.setattr(torch_runtime, "cpu_runs_natively", lambda precision: precision in native)
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, precision="bfloat16", decode_precision="float16")
    message = refused.value.errors()[0]["msg"]
    assert "precision (TTA_PRECISION) bfloat16 and decode_precision (TTA_DECODE_PRECISION) float16" in message
    assert "no native bfloat16 or float16 arithmetic" in message and "use float32" in message
    native.add("bfloat16")
    with pytest.raises(ValidationError, match="TTA_DECODE_PRECISION"):
        Settings(_env_file=None, precision="bfloat16", decode_precision="float16")
    assert Settings(_env_file=None, precision="bfloat16").precision == "bfloat16"
    native.discard("bfloat16")
    for passes in ({"device": "cuda"}, {"runtime": "onnxruntime"}):
        assert Settings(_env_file=None, precision="bfloat16", **passes).precision == "bfloat16"

    with caplog.at_level("WARNING", logger="tta.runtimes"):
        half = load_runtime(model_dir / TINY, "torch", precision="bfloat16")
    assert half.precision == "bfloat16"
    assert [r.getMessage() for r in caplog.records if "native" in r.getMessage()] == [
        "precision bfloat16: this CPU has no native bfloat16 arithmetic, so torch emulates it, tens of times slower "
        "than float32"]


@pytest.mark.parametrize("which", ["embedded", "sao-tiny", "sa3-tiny"])
def test_16_bit_weights_cast_once_give_what_autocast_gives(model_dir, sao_tiny, tmp_path, which):
    """``precision``: linear and convolution weights are cast at load to what autocast would cast them to at every
    call, so the forward is the same bit for bit; norms and the like stay float32."""
    from models.checkpoints.sized import write_random_checkpoint

    path = {"embedded": model_dir / TINY, "sao-tiny": sao_tiny, "sa3-tiny": tmp_path / "sa3-tiny"}[which]
    with float32_default():
        if which == "sa3-tiny":
            write_random_checkpoint(path, "sa3-small", scale="tiny", seed=5)
        ref, half = load_runtime(path, "torch"), load_runtime(path, "torch", precision="bfloat16")
    params = dict(half.bundle.denoiser.named_parameters())
    linear = [n for n, m in half.bundle.denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(params[f"{n}.weight"].dtype == torch.bfloat16 for n in linear)
    assert any(p.dtype == torch.float32 for p in params.values())
    frames = ref.latent_frames(1.0)
    text = ref.encode_text(["a dog barks twice", "rain"])
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, ref.latent_dim, frames, generator=g), torch.tensor([0.9, 0.4]), text.tokens, text.mask,
            text.pooled, torch.tensor([1.0, 1.0]), torch.ones(2, frames, dtype=torch.bool))
    guidance = torch.tensor([3.0, 3.0]) if ref.config.guidance_in_model else None
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = ref.bundle.denoise(*args, guidance=guidance)
        got = half.denoise(*args, guidance=guidance)
    assert torch.equal(got, want)


@pytest.mark.parametrize("which", ["embedded", "sao-tiny", "sa3-tiny"])
def test_each_dit_traces_into_one_graph_without_breaks(model_dir, sao_tiny, tmp_path, which):
    """What torch.compile (and a CUDA graph's capture) need: no data-dependent branch or Python state read in the
    forward. The per-request caches step aside while tracing; the "all frames real" shortcut takes the masked path."""
    from models.checkpoints.sized import write_random_checkpoint

    path = {"embedded": model_dir / TINY, "sao-tiny": sao_tiny, "sa3-tiny": tmp_path / "sa3-tiny"}[which]
    with float32_default():
        if which == "sa3-tiny":
            write_random_checkpoint(path, "sa3-small", scale="tiny", seed=5)
        rt = load_runtime(path, "torch")
    frames = rt.latent_frames(min(1.0, rt.config.max_duration))
    text = rt.encode_text(["a dog barks twice", "rain"])
    guidance = torch.tensor([3.0, 3.0]) if rt.config.guidance_in_model else None
    args = (torch.randn(2, rt.latent_dim, frames), torch.tensor([0.9, 0.4]), text.tokens, text.mask, text.pooled,
            torch.tensor([1.0, 1.0]), torch.ones(2, frames, dtype=torch.bool))
    try:
        with torch.inference_mode():
            explained = torch._dynamo.explain(rt.bundle.denoiser)(*args, guidance=guidance)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
