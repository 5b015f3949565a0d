"""The Oobleck decoder's inference form (``OobleckCodec.prepare_inference``, ``models.checkpoints.snake``).

On any machine: snakes with precomputed constants compute what the expression as written computes (float32, 1e-6
relative) and do no exponential; the whole decoder and encoder in that form match the codec as loaded; training mode
is untouched (gradients reach alpha and beta, the state dict has the same keys, loaded weights are picked up); the
decoder with bfloat16 / float16 weights stays within a measured signal-to-noise ratio of float32 and still answers in
float32; the torch runtime prepares its codec (16-bit when asked; a codec without an inference form stays float32).
Slow: the compiled snake on the CPU equals the eager one. On a CUDA machine (the GPU suite): the compiled snake
kernel and the runtime's 16-bit decode."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import cuda_only, float32_default

from benchmarks.decoder_precision import snr_db
from models.checkpoints import snake as snake_module
from models.checkpoints.oobleck import OobleckCodec, Snake, config_from_stable_audio_tools
from models.checkpoints.reference_configs import sao_small_config
from models.checkpoints.snake import SNAKE_EPS, fused_snake, snake_eager
from service.runtimes import load_runtime
from service.runtimes.torch_runtime import prepare_decoder

cuda = cuda_only("the compiled snake kernel and cuDNN autotuning "
                          "need an NVIDIA GPU; none here (the GPU suite runs these)")
# Measured on the codec below (sao-small's tiny VAE, random snakes, three seeds), CPU: bfloat16 38.5-41 dB, float16
# 56-58.5 dB. The full
# sao-small-sized VAE (default initialisation, 0.19 s): 43 and 61 dB. bfloat16's 8-bit mantissa alone caps a deep
# convolution stack near 40 dB (rounding only the weights gives about that); the limits leave a few dB of margin.
# On CUDA, float32 convolutions use TF32 (10-bit mantissa, as float16's) unless told otherwise.
MIN_SNR_DB = {"bfloat16": 33.0, "float16": 50.0, "float32 on cuda": 45.0}


@pytest.fixture(autouse=True)
def _float32():
    with float32_default():
        yield


def random_snakes(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """alpha, beta ~ N(0, 0.5^2): per-channel a and b away from 1 (default initialisation makes both exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


def tiny_codec(seed: int = 0) -> OobleckCodec:
    """Stable Audio Open Small's VAE at test size, default-initialised convolutions and random snakes, eval mode."""
    pretransform = sao_small_config("tiny")["model"]["pretransform"]
    torch.manual_seed(seed)
    return random_snakes(OobleckCodec(config_from_stable_audio_tools(pretransform, 8000, "tiny")), seed).eval()


def latents(codec: OobleckCodec, b: int = 2, frames: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, codec.latent_dim, frames, generator=torch.Generator().manual_seed(seed))


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


class CountCalls(torch.overrides.TorchFunctionMode):
    """The names of the torch functions and tensor methods called inside."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_prepared_snake_computes_the_expression_without_exponentials():
    snake = random_snakes(Snake(12), seed=3).eval()
    x = 3 * torch.randn(2, 12, 301, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = snake(x)
        snake.prepare()
        with CountCalls() as calls:
            got = snake(x)
    assert relative(got, want) <= 1e-6
    assert "exp" not in calls.names and "reciprocal" not in calls.names
    assert torch.equal(snake.a, snake.alpha.detach().exp())
    assert torch.equal(snake.inv_b, (snake.beta.detach().exp() + SNAKE_EPS).reciprocal())
    assert not snake.a.is_inference()  # prepared under inference mode, usable outside it


def test_the_eager_fused_form_computes_in_float32_and_stores_the_input_type():
    g = torch.Generator().manual_seed(0)
    x, a, inv_b = 4 * torch.randn(2, 6, 50, generator=g), torch.rand(1, 6, 1, generator=g) + 0.5, torch.rand(1, 6, 1)
    want = x.double() + inv_b.double() * torch.sin(a.double() * x.double()) ** 2
    assert relative(snake_eager(x, a, inv_b), want) <= 1e-6
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        got = snake_eager(xh, a, inv_b)
        exact = xh.double() + inv_b.double() * torch.sin(a.double() * xh.double()) ** 2
        assert got.dtype == dtype
        # float32's result rounded once to the 16-bit type: within one of its rounding steps of the exact value
        assert bool(((got.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + 1e-30).all())
        assert snake_eager(xh, a, inv_b, out_dtype=torch.float32).dtype == torch.float32


def test_the_inference_form_decodes_and_encodes_as_the_codec_as_loaded():
    codec = tiny_codec()
    fast = copy.deepcopy(codec).prepare_inference()
    z = latents(codec)
    wave = torch.randn(2, 2, 24 * codec.samples_per_latent, generator=torch.Generator().manual_seed(2)) * 0.3
    with torch.inference_mode():
        want, got = codec.decode(z), fast.decode(z)
        assert want.abs().max() > 1e-3 and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        assert relative(fast.encode(wave), codec.encode(wave)) <= 1e-5
    assert fast.decoder_dtype == torch.float32


def test_training_mode_is_untouched():
    codec = tiny_codec()
    keys = list(codec.state_dict())
    codec.prepare_inference()
    assert list(codec.state_dict()) == keys  # the constants are not saved: checkpoints and loaders see no change
    snakes = [m for m in codec.modules() if isinstance(m, Snake)]
    assert snakes and all(s.a is not None for s in snakes)
    codec.train()
    assert all(s.a is None and s.inv_b is None for s in snakes)
    codec.decode(latents(codec)).pow(2).mean().backward()
    for s in [m for m in codec.decoder.modules() if isinstance(m, Snake)]:
        assert s.alpha.requires_grad and s.alpha.grad is not None and s.alpha.grad.abs().sum() > 0
        assert s.beta.grad is not None and s.beta.grad.abs().sum() > 0
    assert list(codec.state_dict()) == keys


def test_a_codec_made_under_inference_mode_prepares_too():
    codec = tiny_codec()
    z = latents(codec)
    with torch.inference_mode():
        want = codec.decode(z)
        copied = copy.deepcopy(codec)  # its parameters are inference tensors, which keep no version counter
        assert copied.decoder.snake1.alpha.is_inference()
        assert relative(copied.prepare_inference().decode(z), want) <= 1e-5


def test_weights_loaded_after_preparing_are_picked_up():
    codec, other = tiny_codec(seed=0).prepare_inference(), tiny_codec(seed=1)
    z = latents(codec)
    codec.load_state_dict(other.state_dict())  # copies in place: the snakes' constants must follow
    with torch.inference_mode():
        assert relative(codec.decode(z), other.decode(z)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_decoder_stays_near_float32(dtype):
    codec = tiny_codec()
    half = copy.deepcopy(codec).prepare_inference(dtype)
    assert half.decoder_dtype == dtype and half.decoder.block[0].conv_t1.weight.dtype == dtype
    assert half.decoder.conv2.weight.dtype == torch.float32  # the output layer stays float32
    assert half.encoder.conv1.weight.dtype == torch.float32
    z = latents(codec, b=3)
    with torch.inference_mode():
        want, got = codec.decode(z), half.decode(z)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert min(snr_db(got, want)) >= MIN_SNR_DB[str(dtype).removeprefix("torch.")]
    with pytest.raises(ValueError, match="load the codec again"):
        half.prepare_inference(torch.float32)


def test_the_runtime_prepares_its_decoder(sao_tiny, caplog):
    full = load_runtime(sao_tiny, "torch")
    half = load_runtime(sao_tiny, "torch", decode_precision="bfloat16")
    assert (full.decode_precision, full.fast_decoder) == ("float32", True)
    assert (half.decode_precision, half.fast_decoder) == ("bfloat16", True)
    assert all(m.a is not None for m in full.bundle.codec.modules() if isinstance(m, Snake))
    assert half.bundle.codec.decoder_dtype == torch.bfloat16
    z = latents(full.bundle.codec, b=2, frames=16)
    want, got = full.decode_latents(z), half.decode_latents(z)
    assert got.dtype == torch.float32 and min(snr_db(got, want)) >= MIN_SNR_DB["bfloat16"]
    with pytest.raises(ValueError, match="decode_precision 'float8'"):
        load_runtime(sao_tiny, "torch", decode_precision="float8")
    other = SimpleNamespace(codec=torch.nn.Identity(), config=SimpleNamespace(name="other"))  # no inference form
    with caplog.at_level(logging.WARNING, logger="tta.runtimes"):
        assert prepare_decoder(other, "float16") == ("float32", False)
    assert "decodes in float32 only" in caplog.text


def test_a_kernel_that_fails_to_compile_leaves_the_eager_form(monkeypatch, caplog):
    from torch._dynamo.exc import TorchDynamoException

    def broken(*args):
        raise TorchDynamoException("no backend here")

    monkeypatch.setitem(snake_module._COMPILED, "cpu", broken)
    x, a, inv_b = torch.randn(1, 3, 10), torch.ones(1, 3, 1), torch.ones(1, 3, 1)
    with caplog.at_level(logging.WARNING, logger="tta.models"):
        assert torch.equal(fused_snake(x, a, inv_b, compiled=True), snake_eager(x, a, inv_b))
    assert "eager form is used from now on" in caplog.text and snake_module._COMPILED["cpu"] is None


def compiled_matches_eager(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    for channels, length in ((8, 37), (16, 200)):  # two shapes: one dynamic graph serves both
        x = (3 * torch.randn(2, channels, length, generator=g)).to(device)
        a, inv_b = (torch.rand(1, channels, 1, generator=g) + 0.5).to(device), torch.rand(1, channels, 1).to(device)
        assert relative(fused_snake(x, a, inv_b, compiled=True), snake_eager(x, a, inv_b)) <= 1e-6
        for dtype in (torch.bfloat16, torch.float16):
            got, want = fused_snake(x.to(dtype), a, inv_b, compiled=True), snake_eager(x.to(dtype), a, inv_b)
            assert got.dtype == dtype
            assert relative(got, want) <= 2 ** -7  # at most one rounding step of the 16-bit type apart


@pytest.mark.slow
def test_the_compiled_snake_equals_the_eager_one_on_the_cpu(monkeypatch):
    monkeypatch.delitem(snake_module._COMPILED, "cpu", raising=False)
    compiled_matches_eager("cpu")
    assert snake_module._COMPILED["cpu"] is not None  # it compiled, rather than falling back


@cuda
def test_the_compiled_snake_equals_the_eager_one_on_cuda():
    compiled_matches_eager("cuda")
    assert snake_module._COMPILED["cuda"] is not None


@cuda
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_the_runtime_decodes_on_cuda_near_float32(sao_tiny, precision):
    reference = load_runtime(sao_tiny, "torch")  # on the CPU: float32 without TF32
    rt = load_runtime(sao_tiny, "torch", device="cuda", decode_precision=precision)
    benchmark = torch.backends.cudnn.benchmark
    rt.prepare()
    z = latents(reference.bundle.codec, b=2, frames=40)
    want, got = reference.decode_latents(z), rt.decode_latents(z)
    assert torch.backends.cudnn.benchmark == benchmark  # autotuning for the decoder only
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert min(snr_db(got, want)) >= MIN_SNR_DB["float32 on cuda" if precision == "float32" else precision]


def test_the_service_setting_reaches_the_runtime(sao_tiny, monkeypatch):
    from service.app import load_model
    from service.settings import Settings

    monkeypatch.setenv("TTA_DECODE_PRECISION", "float16")
    # as on a CPU with native float16 (elsewhere the settings refuse it: tests/test_torch_runtime.py)
    monkeypatch.setattr("service.runtimes.torch_runtime.cpu_runs_natively", lambda precision: True)
    rt = load_model(sao_tiny, Settings(runtime="torch"))
    assert (rt.decode_precision, rt.bundle.codec.decoder_dtype) == ("float16", torch.float16)


def test_the_precision_benchmark_writes_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """benchmarks.decoder_precision rewrites its results after every row, so a stop at a time limit (SystemExit(143)
    from its SIGTERM handler) leaves the rows measured, marked incomplete with the rest named."""
    import json

    from benchmarks import decoder_precision

    real = decoder_precision.measure

    def stopped_after_three_rows(codecs, args, on_row=None):
        def row_then_stop(rows):
            on_row(rows)
            if len(rows) == 3:
                raise SystemExit(143)
        return real(codecs, args, on_row=row_then_stop)

    monkeypatch.setattr(decoder_precision, "measure", stopped_after_three_rows)
    monkeypatch.setattr("benchmarks.common.stop_on_sigterm", lambda: None)  # pytest's process: no handler
    argv = ["--sized", "sao-small", "--scale", "tiny", "--duration", "0.25", "--batches", "1,2", "--types", "float16",
            "--repeats", "1", "--results-dir", str(tmp_path), "--name", "cut"]
    with pytest.raises(SystemExit):
        decoder_precision.main(argv)
    data = json.loads((tmp_path / "cut.json").read_text())
    assert [(r["batch"], r["variant"]) for r in data["rows"]] == [(1, "float32 as loaded"), (1, "float32"),
                                                                  (1, "float16")]
    assert data["complete"] is False and data["not_run"] == [
        "float32 as loaded at batch 2", "float32 at batch 2", "float16 at batch 2"]
    md = (tmp_path / "cut.md").read_text()
    assert "float16 " in md.split("Worst SNR:")[1] and "**Incomplete.**" in md
    monkeypatch.setattr(decoder_precision, "measure", real)
    whole = decoder_precision.main(argv)
    assert whole["complete"] and whole["not_run"] == [] and len(whole["rows"]) == 6
    assert "Incomplete" not in (tmp_path / "cut.md").read_text()
