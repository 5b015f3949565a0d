"""CUDA graphs for the denoiser: one captured graph per bucketed input shape, replayed at every later call.

A few-step sampler on a GPU spends much of a small batch's forward launching kernels from Python (the embedded DiT
is a few hundred kernels of microseconds each). A CUDA graph records the launches once and replays them in one call.
A graph holds fixed shapes and fixed memory, so inputs are copied into static tensors and padded to a bucket:

- rows to the next bucket of ``models.cuda_capture.ROW_BUCKETS`` (the padding rows repeat row 0, so no row is ever
  fully masked),
- frames to a multiple of ``frame_multiple`` (padding frames are masked, as the scheduler's own padding is),
- text tokens to a multiple of ``token_multiple`` (masked).

Buckets trade padded work against captures: each new key costs a capture (two warm-up forwards and a recorded one)
and holds its static tensors. With 32-frame buckets (1.5 s of the embedded codec) a 10 s model has 7 lengths; with
8 row buckets up to a guided batch of 32, two token buckets and masked / unmasked that is at most 224 keys, of
which ``max_graphs`` = 64 are kept: a dropped key met again is captured again (logged), so the traffic's mix of
lengths and batch sizes decides how often that happens (not measured yet). At small batches a GPU forward is
launch-bound and padded frames cost next to nothing. The service's warm-up calibration captures its sizes before
the service is ready.

The outputs of the real rows and frames are sliced out and copied (the static output is overwritten by the next
replay). Padding cannot change a real row's result beyond float rounding: every sample of a batch is already
computed independently of its companions and of masked frames (``pad_inputs``; ``tests/test_gpu_options.py``).
Denoisers that loop over lengths in Python (``runs_per_length``: a UNet) cannot be captured and stay eager.

Autocast must not cache its casts of the weights while a graph is captured (the cache would hold tensors made
outside the graph's memory pool), so the torch runtime's autocast runs with ``cache_enabled=False`` under graphs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from models.conditioning import AllFramesReal, pad_axis
from models.cuda_capture import GraphCache, capture, round_up, row_bucket

log = logging.getLogger("tta.runtimes")

@dataclass(frozen=True)
class Shape:
    """A graph's key: the padded sizes, whether the frames are masked, whether guidance is an input, and the
    autocast type the graph was captured under."""

    rows: int
    frames: int
    tokens: int
    masked: bool
    guidance: bool
    autocast: torch.dtype | None


def pad_inputs(z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
               frame_mask: Tensor, guidance: Tensor | None, rows: int, frames: int, n_tokens: int) -> tuple:
    """The denoiser's inputs padded to ``rows`` x ``frames`` x ``n_tokens``: padding rows repeat row 0; padding
    frames and tokens are zero and masked. Returns (z, t, tokens, token_mask, pooled, seconds, frame_mask,
    guidance), guidance ``None`` when not given."""
    def rows_of(x: Tensor) -> Tensor:
        extra = rows - x.shape[0]
        return x if extra == 0 else torch.cat([x, x[:1].expand(extra, *x.shape[1:])])

    z = rows_of(pad_axis(z, frames, 2))
    frame_mask = rows_of(pad_axis(frame_mask.bool(), frames, 1))
    tokens = rows_of(pad_axis(tokens, n_tokens, 1))
    token_mask = rows_of(pad_axis(token_mask.bool(), n_tokens, 1))
    out = (z, rows_of(t), tokens, token_mask, rows_of(pooled), rows_of(seconds), frame_mask)
    return out + (rows_of(guidance) if guidance is not None else None,)


class _Graph:
    """One captured forward: its static inputs (``None`` stays ``None``), the graph and its static output."""

    def __init__(self, module: nn.Module, inputs: tuple, pool) -> None:
        self.inputs = tuple(None if x is None else x.clone() for x in inputs)
        self.graph, self.output = capture(lambda: module(*self.inputs[:7], guidance=self.inputs[7]), pool)

    def __call__(self, inputs: tuple) -> Tensor:
        for static, x in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output


class CudaGraphDenoiser(nn.Module):
    """Wraps a denoiser (``forward(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=None)``) on a
    CUDA device: the first call of each bucketed shape captures a graph, later calls replay it. The graphs live in
    a ``GraphCache`` of ``max_graphs`` (least recently used dropped first, one memory pool)."""

    def __init__(self, inner: nn.Module, frame_multiple: int = 32, token_multiple: int = 16, max_graphs: int = 64):
        super().__init__()
        if getattr(inner, "runs_per_length", False):
            raise ValueError("this denoiser loops over lengths in Python and cannot be captured in a CUDA graph")
        self.inner = inner
        self.frame_multiple, self.token_multiple = frame_multiple, token_multiple
        self.graphs: GraphCache[Shape, _Graph] = GraphCache(max_graphs)
        self._all_real = AllFramesReal()

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        if z.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the denoiser's inputs on a CUDA device, got {z.device}")
        if torch.cuda.is_current_stream_capturing():  # inside a whole generation's graph: it records this forward
            return self.inner(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=guidance)
        b, _, n = z.shape
        if frame_mask is None:
            frame_mask = torch.ones(b, n, dtype=torch.bool, device=z.device)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        frames = round_up(n, self.frame_multiple)
        # a graph without a frame mask where every frame is real: some denoisers attend faster without one
        masked = frames != n or not self._all_real(frame_mask)
        key = Shape(row_bucket(b), frames, round_up(tokens.shape[1], self.token_multiple), masked,
                    guidance is not None, autocast)
        inputs = pad_inputs(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance,
                            key.rows, key.frames, key.tokens)
        if not masked:
            inputs = inputs[:6] + (None,) + inputs[7:]
        return self.graphs.get(key, partial(self._capture, key, inputs))(inputs)[:b, :, :n].clone()

    def _capture(self, key: Shape, inputs: tuple, pool) -> _Graph:
        graph = _Graph(self.inner, inputs, pool)
        log.info("captured a CUDA graph", extra={"rows": key.rows, "frames": key.frames, "tokens": key.tokens,
                                                "graphs": len(self.graphs) + 1})
        return graph


def use_cuda_graphs(bundle) -> None:
    """Wrap the bundle's denoiser in ``CudaGraphDenoiser`` (the bundle must be on a CUDA device)."""
    if bundle.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; this model is on {bundle.device} (set TTA_DEVICE=cuda)")
    bundle.denoiser = CudaGraphDenoiser(bundle.denoiser)
    log.info("denoiser runs through CUDA graphs", extra={"model": bundle.config.name})
