"""Runtimes: how a model executes (eager torch today; ONNX Runtime and TensorRT plug in behind the same interface)."""
from __future__ import annotations

from pathlib import Path

from service.runtimes.base import Runtime
from service.runtimes.torch_runtime import TorchRuntime

RUNTIMES = {"torch": TorchRuntime}


def load_runtime(path: Path, runtime: str = "auto", device: str = "cpu", debug_faults: bool = False) -> Runtime:
    """``auto`` picks the best runtime available for the model directory; for now that is always torch."""
    name = "torch" if runtime == "auto" else runtime
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected auto or one of {sorted(RUNTIMES)}")
    rt = RUNTIMES[name].load(Path(path), device=device)
    if debug_faults:
        from service.runtimes.debug import FaultInjectingRuntime

        rt = FaultInjectingRuntime(rt)
    return rt


__all__ = ["Runtime", "TorchRuntime", "load_runtime", "RUNTIMES"]
