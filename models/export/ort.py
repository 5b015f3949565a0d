"""ONNX Runtime sessions: one place that imports onnxruntime (with a clear message when it is missing) and picks
execution providers and thread counts."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.export.graphs import (
    CONTEXT_INPUTS,
    CONTEXT_OUTPUTS,
    DENOISER_OUTPUTS,
    INPAINT_INPUTS,
    INPAINT_OUTPUTS,
    PER_LENGTH_INPUTS,
)

log = logging.getLogger("tta.export")

INSTALL_HINT = "pip install 'tta-serve[onnx]' (or: pip install onnx onnxruntime; onnxruntime-gpu for CUDA)"


class MissingPackage(ImportError):
    """An optional package that a runtime or the export needs is not installed."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingPackage(f"the onnxruntime runtime needs the 'onnxruntime' package: {INSTALL_HINT}") from exc
    return onnxruntime


def import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingPackage(f"exporting to ONNX needs the 'onnx' package: {INSTALL_HINT}") from exc
    return onnx


def onnxruntime_available() -> bool:
    try:
        import_onnxruntime()
    except MissingPackage:
        return False
    return True


def providers(device: str = "cpu") -> list[str]:
    """CUDAExecutionProvider first when the device is CUDA and the installed onnxruntime has it; always the CPU
    provider (as the fallback for operators a GPU provider lacks)."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("device is %s but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); "
                    "running on the CPU", device)
    return ["CPUExecutionProvider"]


_shared_arena_lock = threading.Lock()
_shared_arena = False


def use_shared_cpu_arena(ort) -> bool:
    """One CPU memory arena for every session of the process (registered once; TTA_ORT_SHARED_ARENA=0: each session
    its own). An arena keeps what its largest run needed, so with one per session the process holds the sum of every
    graph's peak (three models' text encoders, denoisers, decoders and encoders: 3.9 GB after a mixed workload of
    batches 1-16 and 1-10 s clips, against 1.35 GB shared, at the same speed); shared, it holds the largest peak and
    what runs at once."""
    global _shared_arena
    if os.environ.get("TTA_ORT_SHARED_ARENA", "1") == "0":
        return False
    with _shared_arena_lock:
        if not _shared_arena:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's defaults
            _shared_arena = True
    return True


def session(path: Path, device: str = "cpu", threads: int | None = None):
    """An InferenceSession with all graph optimisations; intra-op threads follow torch's setting (which the
    service sets from TTA_THREADS), so both runtimes use the same cores."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    # ONNX Runtime's worker threads spin while they wait for work by default. On a small CPU shared with the event
    # loop, the engine thread and torch's own threads, spinning threads take cores from the thread they wait for:
    # with 2 cores under load a DiT forward took twice as long with spinning on. TTA_ORT_SPINNING=1 turns it on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("TTA_ORT_SPINNING", "0"))
    opts.log_severity_level = 3  # errors only: the optimiser's notes about unused initialisers are noise here
    if providers(device) == ["CPUExecutionProvider"] and use_shared_cpu_arena(ort):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))


def run_session(sess, inputs: list[str], output: str, values: dict[str, Tensor]) -> Tensor:
    """``output`` of ``sess`` fed the named ``inputs`` from ``values`` (torch tensors: bool stays bool, the rest goes
    in as float32)."""
    return torch.from_numpy(sess.run([output], _feed(inputs, values))[0])


def per_length_call(sess):
    """A per-length denoiser graph (``PerLengthDenoiserGraph``) as the ``fixed_length`` callable that
    ``models.checkpoints.denoisers.per_length`` drives: (z, timestep, tokens, token_mask) -> out."""

    def fixed_length(z: Tensor, timestep: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        values = {"z": z, "timestep": timestep, "tokens": tokens, "token_mask": token_mask}
        return run_session(sess, PER_LENGTH_INPUTS, DENOISER_OUTPUTS[0], values)

    return fixed_length


class RequestSplitCall:
    """A request-split denoiser's three sessions (``models.export.graphs.StepGraph`` and the per-request graphs
    before it) as torch-in, torch-out calls: ``context`` (once per request), ``inpaint`` (once per inpainting
    request), ``step`` (every step). A batch without inpainting feeds the step ``no_inpainting``'s zeros."""

    def __init__(self, context, step, inpaint=None):
        self.context_session, self.step_session, self.inpaint_session = context, step, inpaint
        self.step_inputs = [i.name for i in step.get_inputs()]
        local = next((i for i in step.get_inputs() if i.name == "local"), None)
        # [depth, batch, frames, width]: depth and width are fixed
        self.local_shape = None if local is None else (int(local.shape[0]), int(local.shape[3]))
        self._zeros: Tensor | None = None

    def context(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor, ...]:
        feed = {"tokens": tokens.float(), "token_mask": token_mask.bool(), "seconds": seconds.float()}
        outs = self.context_session.run(CONTEXT_OUTPUTS, _feed(CONTEXT_INPUTS, feed))
        return tuple(torch.from_numpy(x) for x in outs)

    def inpaint(self, local_cond: Tensor) -> Tensor:
        if self.inpaint_session is None:
            raise ValueError("this denoiser graph takes no inpainting input")
        return run_session(self.inpaint_session, INPAINT_INPUTS, INPAINT_OUTPUTS[0], {"local_cond": local_cond})

    def no_inpainting(self, batch: int, frames: int) -> Tensor | None:
        """The step's ``local`` input for a batch without inpainting: zeros (None when the graph has no such
        input). Kept for the next step of the same shape."""
        if self.local_shape is None:
            return None
        depth, width = self.local_shape
        if self._zeros is None or self._zeros.shape != (depth, batch, frames, width):
            self._zeros = torch.zeros(depth, batch, frames, width)
        return self._zeros

    def step(self, z: Tensor, t: Tensor, frame_mask: Tensor, context: tuple[Tensor, ...],
             local: Tensor | None) -> Tensor:
        keys, values, global_embed = context
        values_ = {"z": z, "t": t, "frame_mask": frame_mask.bool(), "keys": keys, "values": values,
                   "global_embed": global_embed, "local": local}
        return run_session(self.step_session, self.step_inputs, DENOISER_OUTPUTS[0], values_)


def _feed(names: list[str], values: dict[str, Tensor]) -> dict:
    """numpy inputs for a session (no copy where the tensor is already contiguous float32 or bool on the CPU)."""
    return {n: np.ascontiguousarray(values[n].detach().cpu().numpy(),
                                    dtype=np.bool_ if values[n].dtype == torch.bool else np.float32) for n in names}


def request_split_call(context, step, inpaint=None) -> RequestSplitCall:
    return RequestSplitCall(context, step, inpaint)
