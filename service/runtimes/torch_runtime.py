"""The PyTorch runtime: a thin adapter over ``models.bundle.ModelBundle``, eager by default. These options apply to
the denoiser, the part that runs once per step: ``compile`` (``torch.compile`` with dynamic shapes, so that batch
size and length changes do not recompile; ``prepare``, called before the service is ready, compiles the two graphs
that serving needs), ``compile_blocks`` (the same for each block of its repeated stack alone,
``compile_denoiser_blocks``: one compilation serves every block, and the forward can still be captured in CUDA
graphs) and ``precision`` (autocast to bfloat16 or float16 for its matrix products, whose weights are cast to that
type once at load, ``cast_matmul_weights``; the sampler's maths, the noise and the decoder stay float32). On a CUDA
device, ``cuda_graphs`` replays the denoiser's forward from captured CUDA graphs (``service.runtimes.cuda_graphs``);
it excludes ``compile``.

On CUDA the text encoder follows: its weights in bfloat16 with ``precision`` bfloat16 (float16 is left alone: T5's
activations overflow it) and its forward replayed from graphs per (rows, tokens) bucket with ``cuda_graphs``
(``models.text.encoder_graphs``).

The decoder runs its inference form wherever the codec has one (``prepare_inference``: the Oobleck VAE of the Stable
Audio checkpoints): snake constants computed once at load (exact, so always), and with ``decode_precision``
bfloat16 or float16 its weights cast to that type once, no autocast (``models.checkpoints.oobleck``). float16 is the
type Stable Audio's own half-precision VAE flag (``model_half``) means, and the closer of the two to float32
(benchmarks/decoder_precision.py measures the signal-to-noise ratio of each against float32). On CUDA the decoder's
snakes are one compiled kernel each and its convolutions run with cuDNN's autotuning (``cudnn.benchmark``), which
tries the algorithms once per new input shape: a new clip length pays a few milliseconds per layer once."""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.text import TextEmbedding, load_text_encoder
from models.text.encoder_graphs import use_encoder_graphs
from service.runtimes.base import Runtime
from service.runtimes.cuda_graphs import CudaGraphDenoiser, use_cuda_graphs

log = logging.getLogger("tta.runtimes")

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ENCODERS: dict[str, object] = {}
_ENCODERS_LOCK = threading.Lock()


def cpu_runs_natively(precision: str) -> bool:
    """Whether this CPU has native arithmetic for ``precision`` in oneDNN, the library behind torch's CPU matrix
    products and convolutions: bfloat16 on AVX-512 (BW, VL, DQ) or AMX, float16 on AVX512-FP16 or AMX-FP16; float32
    always. Without it torch emulates the 16-bit types, and a 16-bit model is no cheaper but tens of times slower:
    on a 2-core AMD EPYC with AVX2, a 256 x 512 x 512 bfloat16 product took 80 times the float32 one, a 128-channel
    kernel-7 convolution over a second of audio 40 times (float16: about 60 and 30 times), and a Stable-Audio-Open-Small
    decoder in bfloat16 decoded one second in 209 s instead of 2.3 s. True where torch cannot tell."""
    probe = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}.get(precision)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def shared_text_encoder(config: dict, device: str):
    """One (cached) text encoder per (config, device) in the process: models that use the same encoder share its
    weights and its prompt-embedding cache."""
    key = json.dumps(config, sort_keys=True) + "@" + device
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = load_text_encoder(config, device=device)
        return _ENCODERS[key]


class TorchRuntime(Runtime):
    """The bundle's networks, with the denoiser optionally compiled, autocast or replayed from CUDA graphs."""

    name = "torch"

    def __init__(self, bundle: ModelBundle, compile: bool = False, precision: str = "float32",
                 cuda_graphs: bool = False, decode_precision: str = "float32", compile_blocks: bool = False):
        for what, value in (("precision", precision), ("decode_precision", decode_precision)):
            if value not in PRECISIONS:
                raise ValueError(f"{what} {value!r}: expected one of {sorted(PRECISIONS)}")
        if compile and cuda_graphs:
            raise ValueError("choose torch.compile or CUDA graphs for the denoiser, not both")
        if compile and compile_blocks:
            raise ValueError("choose torch.compile of the whole denoiser or of its blocks, not both")
        self.bundle = bundle
        self.config = bundle.config
        self.schedule = bundle.schedule
        self.device = bundle.device
        self.sample_rate = bundle.sample_rate
        self.samples_per_latent = bundle.samples_per_latent
        self.latent_dim = bundle.latent_dim
        self.precision, self.compiled, self.cuda_graphs = precision, bool(compile), bool(cuda_graphs)
        if self.device.type == "cpu":
            for what, value in (("precision", precision), ("decode_precision", decode_precision)):
                if not cpu_runs_natively(value):
                    log.warning("%s %s: this CPU has no native %s arithmetic, so torch emulates it, tens of times "
                                "slower than float32", what, value, value, extra={"model": bundle.config.name})
        self.decode_precision, self.fast_decoder = prepare_decoder(bundle, decode_precision)
        if PRECISIONS[precision] is not None:
            cast_matmul_weights(bundle.denoiser, PRECISIONS[precision])
        if compile:
            compile_denoiser(bundle)
        self.blocks_compiled = compile_denoiser_blocks(bundle) if compile_blocks else 0
        if cuda_graphs:
            use_cuda_graphs(bundle)
        if self.device.type == "cuda" and (cuda_graphs or precision == "bfloat16"):
            # the text encoder's weights in bfloat16 too (not float16: T5's activations overflow it), and its
            # forward from graphs with cuda_graphs
            dtype = torch.bfloat16 if precision == "bfloat16" else None
            if use_encoder_graphs(bundle.text_encoder, dtype, graphs=cuda_graphs):
                log.info("text encoder on the GPU path", extra={"model": bundle.config.name, "graphs": cuda_graphs,
                                                               "dtype": str(dtype or "float32")})

    @classmethod
    def load(cls, path: Path, device: str = "cpu", **options) -> TorchRuntime:
        config = BundleConfig.load(Path(path) / "config.json")
        encoder = shared_text_encoder(config.text_encoder or {"name": "minilm"}, device)
        return cls(ModelBundle.load(path, device=device, text_encoder=encoder), **options)

    def prepare(self) -> None:
        """With ``compile``: compile before serving. torch.compile specialises a batch of one apart from larger
        ones, so both are run once here (a short clip; lengths are dynamic), instead of the first batched tick
        compiling under load (a minute or more on a small CPU). Under inference mode, as the engine runs: the
        compiled graphs are guarded on it. On CUDA the decoder's inference form decodes a short clip once, so that
        its snake kernel is compiled before the first request."""
        if self.fast_decoder and self.device.type == "cuda":
            with torch.inference_mode():
                self.decode_latents(torch.zeros(1, self.latent_dim, self.latent_frames(min(1.0,
                                                                                           self.config.max_duration))))
        if not (self.compiled or self.blocks_compiled):
            return
        t0 = time.perf_counter()
        duration = min(1.0, self.config.max_duration)
        frames = self.latent_frames(duration)
        with torch.inference_mode():
            for batch in (1, 2):
                text = self.encode_text(["warm-up"] * batch)
                self.denoise(torch.randn(batch, self.latent_dim, frames), torch.full((batch,), 0.5), text.tokens,
                             text.mask, text.pooled, torch.full((batch,), duration),
                             torch.ones(batch, frames, dtype=torch.bool))
        log.info("compiled denoiser ready", extra={"model": self.model_name,
                                                   "seconds": round(time.perf_counter() - t0, 1)})

    def graph_captures(self) -> dict[str, int]:
        denoiser = self.bundle.denoiser
        return {"forward": denoiser.graphs.captures} if isinstance(denoiser, CudaGraphDenoiser) else {}

    def latent_frames(self, duration: float) -> int:
        return self.bundle.latent_frames(duration)

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.bundle.encode_text(prompts)

    def unconditional_text(self, n: int) -> TextEmbedding:
        return self.bundle.unconditional_text(n)

    def denoise(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, guidance: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        args = (z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance, local_cond)
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return self.bundle.denoise(*args)
        # autocast's cache of cast weights must stay off while a CUDA graph is captured (cuda_graphs, or a whole
        # generation's graph)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with torch.autocast(self.device.type, dtype=dtype, cache_enabled=not (self.cuda_graphs or capturing)):
            return self.bundle.denoise(*args)

    def encode_audio(self, wave: Tensor) -> Tensor:
        return self.bundle.encode_audio(wave)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decode_on_device(latents).cpu()

    def decode_on_device(self, latents: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return self.bundle.decode_on_device(latents)
        with cudnn_benchmark():
            return self.bundle.decode_on_device(latents)


def prepare_decoder(bundle, precision: str) -> tuple[str, bool]:
    """The bundle's codec in its inference form (``prepare_inference``) with its decoder weights in ``precision``;
    returns the precision the decoder runs in and whether it has the inference form. A codec without one decodes in
    float32, as before, and says so when 16 bits were asked for (one setting serves every model of a process)."""
    prepare = getattr(bundle.codec, "prepare_inference", None)
    if prepare is None:
        if precision != "float32":
            log.warning("decode precision %s: this model's codec (%s) decodes in float32 only", precision,
                        type(bundle.codec).__name__, extra={"model": bundle.config.name})
        return "float32", False
    prepare(PRECISIONS[precision])
    actual = getattr(bundle.codec, "decoder_dtype", None)  # a bundle prepared before keeps its 16-bit weights
    return next((name for name, dtype in PRECISIONS.items() if dtype == actual), precision), True


@contextmanager
def cudnn_benchmark():
    """cuDNN's autotuning on for the calls inside: the decoder's convolutions, whose shapes repeat for every clip of a
    length; the denoiser keeps the process's setting."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def cast_matmul_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """The weights and biases of ``module``'s linear and convolution layers in ``dtype``, once: what autocast casts
    them to at every call, so a forward under autocast gives the same result bit for bit, without re-reading and
    re-casting the float32 weights each time (a captured graph repeats those casts at every replay). Everything else
    (norms, embeddings, Fourier features' frequencies) keeps its float32 values."""
    for m in module.modules():
        if isinstance(m, MATMUL_MODULES):
            m.to(dtype)


def compile_denoiser_blocks(bundle, backend: str = "inductor") -> int:
    """``torch.compile`` each block of the denoiser's repeated stack in place (regional compilation): the largest
    ``nn.ModuleList`` whose members share one class. The blocks run the same code, so one compilation (dynamic
    shapes) serves them all, in seconds where the whole network takes minutes; the rest of the forward stays eager,
    and the whole can still be captured in CUDA graphs (the blocks' kernels are recorded like any others). A network
    with a ``masks_always`` switch (the Stable Audio DiT, which skips its attention mask when every frame is real)
    has it turned on, so that its compiled blocks, their warm-ups and their captures see one form. Returns how many
    blocks were compiled (0: no repeated stack). ``backend``: torch.compile's (``eager`` traces without generating
    code: the check that the blocks trace whole, without graph breaks)."""
    stacks = [m for m in bundle.denoiser.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
              and len({type(block) for block in m}) == 1]
    if not stacks:
        return 0
    stack = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in stack:
        block.compile(dynamic=True, backend=backend)
    for m in bundle.denoiser.modules():
        if hasattr(m, "masks_always"):
            m.masks_always = True
    log.info("denoiser blocks compiled with torch.compile", extra={"model": bundle.config.name, "blocks": len(stack),
                                                                    "block": type(stack[0]).__name__})
    return len(stack)


def compile_denoiser(bundle) -> None:
    """``torch.compile`` the bundle's denoiser in place (dynamic shapes). A denoiser that loops over lengths in
    Python (``runs_per_length``: a UNet) has its network compiled instead, so the loop stays eager."""
    denoiser = bundle.denoiser
    if getattr(denoiser, "runs_per_length", False):
        denoiser.unet = torch.compile(denoiser.unet, dynamic=True)
    else:
        bundle.denoiser = torch.compile(denoiser, dynamic=True)
    log.info("denoiser compiled with torch.compile", extra={"model": bundle.config.name})
