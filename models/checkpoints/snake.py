"""The snake activation ``x + sin^2(a x) / b`` (per channel) of Oobleck-style decoders, in its inference form.

Training keeps ``a`` and ``b`` as log-scale parameters, ``a = exp(alpha)``, ``b = exp(beta) + 1e-9`` (the references'
``alpha_logscale``), and evaluates the expression as written, exponentials and all, so that autograd reaches alpha
and beta (``oobleck.Snake.forward``). An inference forward needs neither: ``snake_constants`` computes ``a`` and
``1 / b`` once at load, and ``fused_snake`` applies them. An SAO-sized decoder runs 36 snakes over tensors of up to
128 channels x 44100 samples per second of audio, so the passes over memory are what a snake costs: the expression as
written makes five full-tensor passes (multiply, sine, square, multiply, add); the eager form here makes four
(multiply, sine, square, multiply-add); on CUDA it is one Inductor-generated (Triton) kernel through
``torch.compile``, reading x once and writing once.

It computes in float32 at least: a decoder that keeps its weights and activations in bfloat16 or float16 stores the
snake's output in that type, but ``sin(a x)`` of a 16-bit argument and the sum with x would lose what float32 keeps.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger("tta.models")

SNAKE_EPS = 1e-9  # added to exp(beta) before the reciprocal, as the references do
_COMPILED: dict[str, Callable | None] = {}
_COMPILE_LOCK = threading.Lock()


def snake_constants(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """(a, 1/b) in float32 from the log-scale parameters, detached: the constants an inference forward uses."""
    with torch.no_grad():
        alpha, beta = alpha.detach().to(_at_least_float32(alpha)), beta.detach().to(_at_least_float32(beta))
        return alpha.exp(), (beta.exp() + SNAKE_EPS).reciprocal()


def _at_least_float32(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def snake_eager(x: Tensor, a: Tensor, inv_b: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``x + inv_b * sin(a x)^2`` computed in float32 (float64 stays float64), returned in ``out_dtype`` (default:
    x's type). ``a`` and ``inv_b`` broadcast against x ([1, C, 1] for [B, C, T])."""
    xf = x.to(_at_least_float32(x))
    return torch.addcmul(xf, inv_b, torch.sin(a * xf).square()).to(out_dtype or x.dtype)


def compiled_snake(device_type: str) -> Callable | None:
    """``snake_eager`` under ``torch.compile`` (dynamic shapes: one graph serves every layer's channel count and every
    length) for this device type, built once per process; None where it cannot be built (torch.compile unavailable)."""
    with _COMPILE_LOCK:
        if device_type not in _COMPILED:
            try:
                _COMPILED[device_type] = torch.compile(snake_eager, dynamic=True)
            except Exception as exc:  # noqa: BLE001 - the eager form computes the same thing
                log.warning("fused snake: torch.compile unavailable (%s: %s); the eager form is used",
                            type(exc).__name__, exc)
                _COMPILED[device_type] = None
        return _COMPILED[device_type]


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed torch.compile raises at its first call (Dynamo wraps the backend's own errors)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - a torch without Dynamo never built a compiled kernel
        return ()
    return (TorchDynamoException,)


def fused_snake(x: Tensor, a: Tensor, inv_b: Tensor, out_dtype: torch.dtype | None = None,
                compiled: bool | None = None) -> Tensor:
    """The snake with prepared constants (``snake_constants``). ``compiled``: one generated kernel (default: on CUDA,
    where the eager form's extra passes cost most; on a CPU the compiler's C++ build is a price to choose). A kernel
    that fails to compile (no Triton, no C++ compiler) is reported once and the eager form takes over."""
    if compiled is None:
        compiled = x.is_cuda
    fn = compiled_snake(x.device.type) if compiled else None
    if fn is not None:
        try:  # the output type named, so that None and x's own type share a graph
            return fn(x, a, inv_b, out_dtype or x.dtype)
        except _compile_errors() as exc:  # a compiler failure must not take decoding down; a runtime error does
            log.warning("fused snake: the compiled kernel failed on %s (%s: %s); the eager form is used from now on",
                        x.device.type, type(exc).__name__, exc)
            with _COMPILE_LOCK:
                _COMPILED[x.device.type] = None
    return snake_eager(x, a, inv_b, out_dtype)
