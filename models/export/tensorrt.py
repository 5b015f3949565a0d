"""TensorRT engines from the ONNX export: what each engine must be built for, and when one has to be built again.

Pure logic, with no GPU and no TensorRT needed: the optimisation profile of each graph (from the dynamic axes its
manifest entry names and the model's limits), the precision each graph is built at, the key an engine is stored
with (TensorRT version, GPU name and compute capability, the ONNX graph's sha256, precision, profile) and the rules
that compare a stored key with the one wanted. ``tensorrt_engines`` builds and finds the engines; the
``tensorrt`` runtime (``service.runtimes.tensorrt_runtime``) runs them.

Written against TensorRT 10's documented Python API. It has not been executed in this project's CI or benchmarks:
no machine they run on has TensorRT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models.export.graphs import encoder_input_axes, start_native
from models.export.manifest import ExportError
from models.export.ort import MissingPackage, import_onnx
from models.export.serving import latent_frames, serving_config

INSTALL_HINT = ("pip install 'tensorrt-cu12>=10,<11' (NVIDIA's wheels: they fetch their libraries from NVIDIA's "
                "package index, and run only on a Linux or Windows machine with an NVIDIA GPU and CUDA 12 driver)")
MAJOR = 10  # BuilderFlag.FP16 / BF16 are gone in TensorRT 11 (strong typing replaces them)
ENGINE_FORMAT = 1  # bump when what an engine is built from changes in a way the key does not show
MAX_BATCH = 32  # rows of one engine run: a guided batch of 16 samples (the service's default max_batch)
OPT_BATCH = 4
OPT_TOKENS = 32  # a typical prompt is shorter: the text axes' optimum, within the encoder's maximum
PRECISIONS = ("fp16", "bf16")
DEFAULT_PRECISION = "fp16"
# the graphs run at every step (or once per request, feeding them): built at the asked precision, as the torch
# runtime's ``precision`` applies to the denoiser only; the text encoder and the codec's graphs stay float32
DENOISER_GRAPHS = ("denoiser", "context", "inpaint")
# the service's TTA_PRECISION names -> engine precisions (float32: whatever the existing engines were built at)
SETTING_PRECISIONS = {"float16": "fp16", "bfloat16": "bf16", "float32": None}


def import_tensorrt(purpose: str = "the tensorrt runtime"):
    """The ``tensorrt`` module, or ``MissingPackage`` saying how to install it (also when the installed one is not
    TensorRT 10, whose builder API this backend is written against)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingPackage(f"{purpose} needs the 'tensorrt' package: {INSTALL_HINT}") from exc
    version = str(getattr(tensorrt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) != MAJOR:
        raise MissingPackage(f"{purpose} needs TensorRT {MAJOR}.x, found {version}: {INSTALL_HINT}")
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except MissingPackage:
        return False
    return True


def engine_precision(name: str | None) -> str | None:
    """An engine precision from ``fp16`` / ``bf16`` or the service's setting names (``float32`` and None: not
    asked, i.e. whatever the existing engines were built at)."""
    if name is None or name in PRECISIONS:
        return name
    if name in SETTING_PRECISIONS:
        return SETTING_PRECISIONS[name]
    raise ValueError(f"precision {name!r}: expected one of {', '.join(PRECISIONS)} "
                     f"(or {', '.join(SETTING_PRECISIONS)})")


def graph_precision(graph: str, precision: str) -> str:
    """The precision one graph is built at: ``precision`` for the denoiser's graphs, ``fp32`` for the others."""
    return precision if graph in DENOISER_GRAPHS else "fp32"


def check_precision(precision: str, gpu: dict) -> None:
    """bfloat16 kernels need compute capability 8.0 (Ampere) or later."""
    major = int(str(gpu["compute_capability"]).split(".")[0])
    if precision == "bf16" and major < 8:
        raise ExportError(f"bf16 engines need a GPU of compute capability 8.0 or later; {gpu['name']} has "
                          f"{gpu['compute_capability']} (use fp16)")


def gpu_identity(device: str = "cuda") -> dict | None:
    """{"name", "compute_capability"} of the CUDA device ``device`` names, or None without one: an engine runs
    only on the GPU model it was built for."""
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


# ---------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class ProfileLimits:
    """(min, opt, max) of every named axis the export's graphs have. ``analysis``: the encoder graph's input length
    axis in its own units (STFT frames, or samples), from one latent frame to the model's maximum."""

    max_frames: int
    opt_frames: int
    max_tokens: int
    opt_tokens: int
    analysis: tuple[int, int, int] | None = None
    max_batch: int = MAX_BATCH
    opt_batch: int = OPT_BATCH

    def axes(self, graph: str) -> dict[str, tuple[int, int, int] | None]:
        tokens = (1, self.opt_tokens, self.max_tokens)
        axes = {"batch": (1, min(self.opt_batch, self.max_batch), self.max_batch),
                "frames": (1, self.opt_frames, self.max_frames), "length": tokens, "text_length": tokens}
        if graph == "encoder":
            axes["frames"] = axes["samples"] = self.analysis
        return axes


def profile_limits(model_dir: Path, manifest: dict) -> ProfileLimits:
    """The ranges from the manifest (the longest clip in latent frames, the text encoder's token limit) and the
    model's configuration (its default duration is the frames' optimum)."""
    codec = manifest["codec"]
    rate, spl = int(codec["sample_rate"]), int(codec["samples_per_latent"])
    max_frames = int(manifest["limits"]["max_latent_frames"])
    default = latent_frames(serving_config(model_dir, manifest).default_duration, rate, spl)
    opt_frames = min(max(1, default), max_frames)
    max_tokens = int(manifest["text_encoder"]["max_length"])
    analysis = None
    if "native_head" in codec:
        analysis = encoder_input_lengths(codec, (1, opt_frames, max_frames))
    return ProfileLimits(max_frames, opt_frames, max_tokens, min(OPT_TOKENS, max_tokens), analysis)


def encoder_input_lengths(codec: dict, frames: tuple[int, ...]) -> tuple[int, ...]:
    """The encoder graph's input length for clips of ``frames`` latent frames: what ``start_native`` (the runtime's
    step before the graph) makes of them."""
    head = codec["native_head"]
    axis = next(k for k in encoder_input_axes(head) if k != 0)
    rate, spl, channels = int(codec["sample_rate"]), int(codec["samples_per_latent"]), int(codec["audio_channels"])
    return tuple(int(start_native(torch.zeros(1, channels, f * spl), head, rate, spl).shape[axis]) for f in frames)


def graph_profile(graph: str, entry: dict, limits: ProfileLimits) -> dict[str, list[list[int]]]:
    """{input: [min shape, opt shape, max shape]} for the inputs of one graph (its manifest entry) that have a
    dynamic axis; an axis name with no known range is an error rather than a guess."""
    axes = limits.axes(graph)
    profile = {}
    for inp in entry["inputs"]:
        dims = inp["shape"]
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        unknown = [d for d in dims if not (isinstance(d, int) and d > 0) and axes.get(d) is None]
        if unknown:
            raise ExportError(f"{graph}: input {inp['name']} {dims} has axes {unknown} with no TensorRT range")
        profile[inp["name"]] = [[d if isinstance(d, int) else axes[d][k] for d in dims] for k in range(3)]
    return profile


# ---------------------------------------------------------------------------------------------------- keys, rules
def engine_key(trt_version: str, gpu: dict, entry: dict, precision: str, profile: dict) -> dict:
    """What an engine is built from; stored in the JSON beside it. A difference in any field means rebuilding."""
    graph = {"file": entry["file"], "sha256": entry["sha256"],
             "external_sha256": (entry.get("external_data") or {}).get("sha256")}
    return {"format": ENGINE_FORMAT, "tensorrt": str(trt_version),
            "gpu": {"name": gpu["name"], "compute_capability": str(gpu["compute_capability"])},
            "graph": graph, "precision": precision, "profile": profile}


_FIELDS = (("format", "engine format"), ("tensorrt", "TensorRT version"), ("gpu", "GPU"), ("graph", "ONNX graph"),
           ("precision", "precision"), ("profile", "optimisation profile"))


def _show(field: str, value) -> str:
    if field == "gpu" and isinstance(value, dict):
        return f"{value.get('name')} (sm {value.get('compute_capability')})"
    if field == "graph" and isinstance(value, dict):
        return f"sha256 {str(value.get('sha256'))[:12]}"
    if field == "profile":
        return "other shapes"
    return str(value)


def needs_rebuild(record: dict | None, key: dict, engine: Path) -> str | None:
    """Why the engine at ``engine`` must be built (again), or None when its record was made for exactly ``key``.
    A record of a failed build for the same key is not retried (that graph runs under ONNX Runtime) until something
    in the key changes, or the build is forced."""
    if record is None:
        return "no engine yet"
    stored = record.get("key") or {}
    for field, label in _FIELDS:
        if stored.get(field) != key[field]:
            return f"{label} changed: {_show(field, stored.get(field))} -> {_show(field, key[field])}"
    if "failed" in record:
        return None
    if not engine.is_file() or engine.stat().st_size != record.get("bytes"):
        return "the engine file is missing or incomplete"
    return None


def timing_cache_name(trt_version: str, gpu: dict) -> str:
    """One timing cache per TensorRT version and GPU model (a cache from another one does not apply), shared by
    every engine built in the directory: layers met before are not timed again."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-").lower()
    return f"timing-{trt_version}-{slug}-sm{str(gpu['compute_capability']).replace('.', '')}.cache"


def tensorrt_blocker(onnx_path: Path) -> str | None:
    """Why a graph is left to ONNX Runtime instead of TensorRT, or None. TensorRT has no float64: a graph that
    computes in it (the harmonic codec's decoder accumulates phases with a float64 CumSum, which its parity with
    PyTorch depends on) would run in float32, outside what its export was checked for."""
    onnx = import_onnx()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    double = onnx.TensorProto.DOUBLE
    casts = any(n.op_type == "Cast" and any(a.name == "to" and a.i == double for a in n.attribute) for n in graph.node)
    tensors = any(t.data_type == double for t in graph.initializer)
    io = any(v.type.tensor_type.elem_type == double for v in [*graph.input, *graph.output])
    if casts or tensors or io:
        return "the graph computes in float64, which TensorRT does not have (it runs under ONNX Runtime)"
    return None
