"""The TensorRT runtime: the ONNX export's graphs run as TensorRT engines (``models.export.tensorrt_engines``).

It is the ONNX runtime with another way to open a graph: a graph with a current engine runs through an
``EngineSession``, which offers the part of ONNX Runtime's session interface that ``OnnxRuntime`` calls (``run``,
``get_inputs``, ``get_providers``), so tokenisation, the per-length loop, the request-split caches and the codec's
steps around the graphs are one code path for both runtimes. A graph TensorRT could not take (its engine record
says why: the harmonic codec's float64 decoder, a parser error) stays an ONNX Runtime session.

Engines are built when missing or stale (TensorRT version, GPU, ONNX graph, precision or profile changed) on first
use, or ahead of time by ``tta export --format tensorrt``; ``auto`` picks this runtime on a CUDA device only when
current engines already exist.

Written against TensorRT 10's documented Python API, with torch CUDA tensors as the engines' buffers. It has not
been executed in this project's CI or benchmarks: no machine they run on has TensorRT.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.export import ensure_onnx_export
from models.export.tensorrt import import_tensorrt
from models.export.tensorrt_engines import EnginePlan, ensure_engines
from service.runtimes.onnx_runtime import OnnxRuntime

log = logging.getLogger("tta.runtimes")

_TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


@dataclass(frozen=True)
class TensorInfo:
    """An engine input as ``get_inputs`` lists it: its name and shape (-1 for a dynamic axis)."""

    name: str
    shape: list[int]


def batch_axes(entry: dict) -> dict[str, int]:
    """Each input's and output's batch axis, by name, from its manifest entry (``keys`` and ``values`` of a
    request-split context graph have it second)."""
    tensors = [*entry["inputs"], *entry["outputs"]]
    return {v["name"]: v["shape"].index("batch") for v in tensors if "batch" in v["shape"]}


def run_in_row_chunks(execute, inputs: dict[str, Tensor], axes: dict[str, int],
                      max_rows: int | None) -> dict[str, Tensor]:
    """``execute(inputs)`` in pieces of at most ``max_rows`` rows along each tensor's batch axis, the outputs joined
    again: a batch larger than the engine's profile runs as several (rows are independent of each other)."""
    batched = [n for n in inputs if n in axes]
    rows = inputs[batched[0]].shape[axes[batched[0]]] if batched else 0
    if max_rows is None or rows <= max_rows:
        return execute(inputs)
    parts = [execute({n: x.narrow(axes[n], start, min(max_rows, rows - start)) if n in axes else x
                      for n, x in inputs.items()}) for start in range(0, rows, max_rows)]
    return {n: torch.cat([p[n] for p in parts], dim=axes[n]) if n in axes else parts[0][n] for n in parts[0]}


class EngineSession:
    """One deserialised engine and its execution context, run on the current CUDA stream with torch tensors as
    input and output buffers. Calls are serialised (an execution context runs one inference at a time)."""

    def __init__(self, trt, path: Path, entry: dict, device: str):
        self.device = torch.device(device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path} (the TensorRT log above says why)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.types = {n: _TORCH_TYPES[_type_name(self.engine.get_tensor_dtype(n))] for n in names}
        self.ranges = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs
                       if any(int(d) < 0 for d in self.engine.get_tensor_shape(n))}
        self.axes = batch_axes(entry)
        self.max_rows = min((r[2][self.axes[n]] for n, r in self.ranges.items() if n in self.axes), default=None)
        self._lock = threading.Lock()

    def get_inputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, [int(d) for d in self.engine.get_tensor_shape(n)]) for n in self.inputs]

    def get_providers(self) -> list[str]:
        return ["TensorRT"]

    def run(self, output_names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """As ``InferenceSession.run``: numpy in, numpy out (float32 for a half-precision output)."""
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise ValueError(f"the engine needs inputs {missing}")
        inputs = {n: torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.inputs}
        outputs = run_in_row_chunks(self._execute, inputs, self.axes, self.max_rows)
        return [_host(outputs[n]) for n in output_names]

    def _execute(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            bound = {}
            for name in self.inputs:
                x = inputs[name].to(self.device, self.types[name]).contiguous()
                self._check_shape(name, tuple(x.shape))
                if not self.context.set_input_shape(name, tuple(x.shape)):
                    raise ValueError(f"TensorRT refused the shape {tuple(x.shape)} for input {name}")
                self.context.set_tensor_address(name, x.data_ptr())
                bound[name] = x  # alive until the run is done
            outputs = {}
            for name in self.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.types[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT could not run the engine (the TensorRT log above says why)")
            stream.synchronize()
        return outputs

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.ranges:
            return
        low, _, high = self.ranges[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise ValueError(f"input {name} of shape {shape} is outside the engine's profile {low} .. {high}")


def _type_name(dtype) -> str:
    return getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])


def _host(x: Tensor) -> np.ndarray:
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.cpu().numpy()


class TensorRTRuntime(OnnxRuntime):
    name = "tensorrt"

    def __init__(self, path: Path, export, engines: dict[str, EnginePlan], device: str = "cuda"):
        self.engines = {graph: plan.engine for graph, plan in engines.items() if plan.usable}
        super().__init__(path, export, device=device)

    def open_graph(self, graph: str):
        """The graph's engine; an ONNX Runtime session for a graph TensorRT could not take."""
        if graph in self.engines:
            return EngineSession(import_tensorrt(), self.engines[graph], self.export.manifest["graphs"][graph],
                                 self.device)
        return super().open_graph(graph)

    @classmethod
    def load(cls, path: Path, device: str = "cuda", precision: str | None = None) -> TensorRTRuntime:
        """``precision``: fp16 / bf16 (or the service's float16 / bfloat16); float32 or None keeps the precision
        the existing engines were built at (fp16 when there are none)."""
        import_tensorrt()  # a clear MissingPackage before anything is exported or built
        if torch.device(device).type != "cuda":
            raise ValueError(f"the tensorrt runtime runs on a CUDA device, not {device} (set TTA_DEVICE=cuda)")
        export = ensure_onnx_export(path)
        rt = cls(path, export, ensure_engines(Path(path), export, precision, device), device)
        others = sorted(set(export.manifest["graphs"]) - set(rt.engines))
        log.info("tensorrt model ready", extra={"model": rt.model_name, "export_dir": str(export.dir),
                                                "engines": sorted(rt.engines), "onnxruntime_graphs": others})
        return rt
