"""Runtimes: how a model executes. ``torch`` (eager PyTorch), ``onnxruntime`` (exported graphs) and ``tensorrt``
(engines built from those graphs; not executed in this project's CI or benchmarks) implement one interface."""
from __future__ import annotations

import logging
from pathlib import Path

from models.checkpoints import is_checkpoint_dir, load_checkpoint_dir
from models.export.ort import MissingPackage, onnxruntime_available
from models.export.tensorrt_engines import engines_ready
from service.runtimes.base import Runtime
from service.runtimes.onnx_runtime import OnnxRuntime
from service.runtimes.tensorrt_runtime import TensorRTRuntime
from service.runtimes.torch_runtime import TorchRuntime

log = logging.getLogger("tta.runtimes")

RUNTIMES = {"torch": TorchRuntime, "onnxruntime": OnnxRuntime, "tensorrt": TensorRTRuntime}
EXPORTED = ("onnxruntime", "tensorrt")  # the runtimes that serve exported graphs


def resolve_runtime(runtime: str, device: str = "cpu", path: Path | None = None, precision: str | None = None) -> str:
    """The runtime a setting asks for. ``auto``: on the CPU, ONNX Runtime when onnxruntime can be imported, else
    torch; on CUDA, TensorRT when tensorrt imports and current engines of the model at ``path`` (of ``precision``,
    when one is asked for) exist, else torch. ``auto`` never builds engines."""
    if runtime == "auto":
        if str(device).startswith("cuda"):
            return "tensorrt" if path is not None and engines_ready(Path(path), device, precision) else "torch"
        return "onnxruntime" if device == "cpu" and onnxruntime_available() else "torch"
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected auto or one of {sorted(RUNTIMES)}")
    return runtime


def load_runtime(path: Path, runtime: str = "torch", device: str = "cpu", debug_faults: bool = False,
                 **torch_options) -> Runtime:
    """Load the model at ``path`` under ``runtime`` (the service passes its ``runtime`` setting; the library default
    is the eager reference). A runtime whose package is missing never stops the service: the model is served by
    torch and the log says why. Any other failure of the runtime ``auto`` chose also falls back to torch; a runtime
    asked for by name fails loudly instead. A downloaded checkpoint directory (``models.checkpoints``: Stable Audio,
    Tango, derived models) runs under eager torch unless ``onnxruntime`` or ``tensorrt`` is asked for by name, or
    ``auto`` finds current TensorRT engines for it: ``auto`` does not export a checkpoint of hundreds of millions of
    parameters behind the user's back (``tta export`` does it ahead of time, for every format). ``torch_options``
    (``compile``, ``precision``, ``cuda_graphs``) apply wherever torch serves; ``precision`` also picks the
    TensorRT engines' (float16 / bfloat16)."""
    path = Path(path)
    name = resolve_runtime(runtime, device, path, torch_options.get("precision"))
    if is_checkpoint_dir(path) and runtime not in EXPORTED and name != "tensorrt":
        rt: Runtime = TorchRuntime(load_checkpoint_dir(path, device=device), **torch_options)
        return _with_faults(rt) if debug_faults else rt
    try:
        rt = RUNTIMES[name].load(path, device=device, **_options(name, torch_options))
    except MissingPackage as exc:
        log.warning("%s; serving %s with the torch runtime instead", exc, path.name)
        rt = TorchRuntime.load(path, device=device, **torch_options)
    except Exception as exc:
        if runtime != "auto" or name == "torch":
            raise
        log.warning("runtime %s failed for %s (%s: %s); serving it with the torch runtime instead", name, path.name,
                    type(exc).__name__, exc)
        rt = TorchRuntime.load(path, device=device, **torch_options)
    return _with_faults(rt) if debug_faults else rt


def _options(name: str, torch_options: dict) -> dict:
    """What a runtime's ``load`` takes of the torch options."""
    if name == "torch":
        return torch_options
    if name == "tensorrt":
        return {"precision": torch_options.get("precision")}
    return {}


def _with_faults(rt: Runtime) -> Runtime:
    from service.runtimes.debug import FaultInjectingRuntime

    return FaultInjectingRuntime(rt)


__all__ = ["RUNTIMES", "OnnxRuntime", "Runtime", "TensorRTRuntime", "TorchRuntime", "load_runtime",
           "resolve_runtime"]
