"""ONNX Runtime sessions: one place that imports onnxruntime (with a clear message when it is missing) and picks
execution providers and thread counts."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.export.graphs import DENOISER_OUTPUTS, PER_LENGTH_INPUTS

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
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))


def run_session(sess, inputs: list[str], output: str, values: dict[str, Tensor]) -> Tensor:
    """``output`` of ``sess`` fed the named ``inputs`` from ``values`` (torch tensors: bool stays bool, the rest goes
    in as float32)."""
    feed = {}
    for name in inputs:
        x = values[name]
        dtype = np.bool_ if x.dtype == torch.bool else np.float32
        feed[name] = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)
    return torch.from_numpy(sess.run([output], feed)[0])


def per_length_call(sess):
    """A per-length denoiser graph (``PerLengthDenoiserGraph``) as the ``fixed_length`` callable that
    ``models.checkpoints.denoisers.per_length`` drives: (z, timestep, tokens, token_mask) -> out."""

    def fixed_length(z: Tensor, timestep: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        values = {"z": z, "timestep": timestep, "tokens": tokens, "token_mask": token_mask}
        return run_session(sess, PER_LENGTH_INPUTS, DENOISER_OUTPUTS[0], values)

    return fixed_length
