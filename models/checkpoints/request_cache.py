"""Results that depend on a request alone, kept while its batch lives rather than recomputed at every step.

A diffusion step's cross-attention keys and values, and the embeddings of the conditioning, depend only on the
request (its prompt's tokens, its duration), never on the step. ``RequestCache`` keeps them per request, for the
torch denoisers that split their forward there (Stable Audio 3, Stable Audio Open) and for the ONNX Runtime
runtime's per-request graphs. ``cache_state`` says what a kept result is valid for, and when nothing may be kept.
"""
from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def context_rows(tokens: Tensor, token_mask: Tensor, seconds: Tensor, text_len: int) -> list[bytes]:
    """Per row, what its ``request_state`` depends on: the positions of its real tokens among the first
    ``text_len`` (the other positions become the padding embedding), those tokens, its seconds. Rows of one request
    in batches padded to other token counts have the same digest."""
    out = []
    for i in range(tokens.shape[0]):
        keep = token_mask[i, :text_len].bool()
        out.append(row_digest(torch.nonzero(keep).flatten(), tokens[i, :text_len][keep], seconds[i]))
    return out


def row_digest(*tensors: Tensor) -> bytes:
    """A digest of tensors' shapes, types and values (one batch row's inputs)."""
    h = hashlib.blake2b(digest_size=20)
    for x in tensors:
        h.update(f"{tuple(x.shape)}{x.dtype};".encode())
        flat = x.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.digest()


def cache_state(module: nn.Module, x: Tensor) -> tuple | None:
    """What a cached result is valid for besides its inputs: the module's weights (their version counters rise with
    every in-place change: an optimiser step, a load), the input type, autocast. None where nothing is cached:
    with gradients (training), inside torch.compile's tracing, an ONNX export or a CUDA graph capture (the cache's
    Python logic must not be traced or captured, nor a kept result become a graph constant), or with weights that
    keep no version (made under inference mode)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing() or \
            torch.onnx.is_in_onnx_export():
        return None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    try:
        version = sum(p._version for p in module.parameters())
    except RuntimeError:  # inference tensors have no version counter
        return None
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (version, x.dtype, str(x.device), autocast)


@dataclass(eq=False)
class _Entry:
    refs: tuple  # weak references to the input tensors
    rows: list[bytes]
    state: tuple
    outputs: tuple


class RequestCache:
    """Results of a function of a batch of per-request inputs that stay the same across the request's steps (its
    conditioning, its inpainting input), computed once per request rather than at every step. Backend-neutral: the
    torch denoiser keeps one, the ONNX Runtime runtime another for its graphs.

    ``get(inputs, state, compute, rows, axes)``:
    1. the same input tensors (by identity) as a batch seen before, in the same ``state``: that batch's outputs, as
       they are. The pipeline's ``DenoiseBatch`` passes the same conditioning tensors at every step while its
       samples stay, so a stable batch costs a lookup;
    2. else each row by its content (``rows(*inputs)``: one digest per row of what the outputs depend on): rows
       that a live batch holds are gathered from it, the others computed in one ``compute`` call over just those
       rows, and the batch's outputs assembled along each output's batch axis (``axes``). So a request that joins
       a running batch costs its own rows; a sample that leaves costs a gather.

    An entry lives as long as its input tensors (the batch that will use it again) and, besides, the most recent one
    stays (the pipeline rebuilds a batch's tensors when samples join or leave, and some inputs, such as the
    inpainting input, are made afresh at every step). Inputs are taken as immutable, as the pipeline's are. Results
    equal ``compute`` on the whole batch: every row of these functions is computed independently of the others."""

    def __init__(self):
        self._live: dict[int, _Entry] = {}
        self._last: _Entry | None = None
        self._ids = itertools.count()
        self.hits = self.row_hits = self.computed_rows = 0  # counters, for tests and profiles

    def __deepcopy__(self, memo):
        return RequestCache()  # a copied module (a student) has its own weights: nothing carries over

    def __getstate__(self):
        return {}

    def __setstate__(self, _):
        self.__init__()

    def clear(self) -> None:
        self._live.clear()
        self._last = None

    def _entries(self) -> list[_Entry]:
        out = list(self._live.values())
        return out + [self._last] if self._last is not None and all(e is not self._last for e in out) else out

    def get(self, inputs: Sequence[Tensor], state: tuple, compute: Callable[..., tuple | Tensor],
            rows: Callable[..., list[bytes]], axes: Sequence[int]) -> tuple:
        entries = [e for e in self._entries() if e.state == state]
        for e in entries:
            if len(e.refs) == len(inputs) and all(r() is x for r, x in zip(e.refs, inputs)):
                self.hits += 1
                self._last = e
                return e.outputs
        digests = rows(*inputs)
        known: dict[bytes, tuple[_Entry, int]] = {}
        for e in entries:
            for i, d in enumerate(e.rows):
                known.setdefault(d, (e, i))
        missing = [i for i, d in enumerate(digests) if d not in known]
        sources = [known.get(d) for d in digests]
        first = sources[0][0] if sources and sources[0] else None
        if len(missing) == len(digests):
            outputs = _as_tuple(compute(*inputs))
        elif first is not None and len(first.rows) == len(digests) and all(
                s is not None and s[0] is first and s[1] == i for i, s in enumerate(sources)):
            outputs = first.outputs  # exactly one earlier batch's rows, in its order
        else:
            index = torch.tensor(missing, dtype=torch.long)
            fresh = _as_tuple(compute(*(x.index_select(0, index.to(x.device)) for x in inputs))) if missing else ()
            position = {i: j for j, i in enumerate(missing)}
            parts = []
            for k, axis in enumerate(axes):
                pieces = []
                for i, found in enumerate(sources):
                    source, row = (fresh, position[i]) if found is None else (found[0].outputs, found[1])
                    pieces.append(source[k].narrow(axis, row, 1))
                parts.append(torch.cat(pieces, dim=axis))
            outputs = tuple(parts)
        self.row_hits += len(digests) - len(missing)
        self.computed_rows += len(missing)
        entry = _Entry(tuple(weakref.ref(x) for x in inputs), digests, state, outputs)
        key = next(self._ids)
        self._live[key] = entry
        for x in inputs:
            weakref.finalize(x, self._live.pop, key, None)
        self._last = entry
        return outputs


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
