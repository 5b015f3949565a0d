"""A continuous-batching tick as one CUDA graph: the denoiser forward and the sampler step of a ``DenoiseBatch``
(``Pipeline.advance``: the per-sample times gathered from the grids, classifier-free guidance, the x0 conversion, the
inpainting blend, the sampler's update with its pre-drawn noise, the frame mask), replayed in one call.

Per-forward graphs (``service.runtimes.cuda_graphs``) record the forward only; the twenty-odd small kernels of the
gathers, the guidance mix and the sampler step around it are still launched from Python at every tick. A tick graph
records them together. It belongs to a ``TickKey``: the batch's rows, its latent frames rounded up to
``frame_multiple``, grid width, which rows are guided, its token count rounded up to ``token_multiple``, and whether
it inpaints. Samples of one key may differ in everything else: length (the frame mask is part of the state, and
frames beyond a batch's own are masked, as the batch masks its shorter samples'), steps (the grids are), the step
each one is at, seeds, prompts, guidance scales, negative prompts, inpainting spans.

A running batch stays the same object while its samples stay (``service.runner.ModelRunner``). When a batch first
steps through a graph, its whole state is copied into the graph's fixed batch (``DenoiseBatch.load``); at each tick
after that only its latents and step indices are, since nothing else of a batch changes while it lives. The replay
writes the next latents into the graph's static output, which the batch takes a copy of (``Pipeline.take_step``), so
batches of one key never share memory. A capture costs a few ticks' time, so a key is captured only once it recurs:
when the ``capture_after``-th batch object of that key steps (the ticks of one batch count once, so traffic whose
batch shapes never repeat is left to the plain step). The engine's runner puts guided samples first in a batch, so
that a mix of guided and unguided requests meets one key per count of guided rows, not one per order of arrival.
The ``max_graphs`` most recently used are kept.

Every random number is still drawn on the host when a sample starts (``Pipeline.place``), so a seed gives the audio
the step path gives, up to float rounding where a prompt or the frames are padded to the key's. Without CUDA there is
nothing to capture; the CPU tests record the program with a recorder that reruns it eagerly into the same static
output, which checks everything around the replay (the keys, the loads, the copies).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from models.cuda_capture import GraphCache, Record, Sightings, capture, round_up
from models.pipeline import DenoiseBatch, Pipeline

log = logging.getLogger("tta.tick_graph")


@dataclass(frozen=True)
class TickKey:
    rows: int
    frames: int  # the graph's: the batch's rounded up
    width: int  # grid width: the largest step count of the batch, plus one
    guided: tuple[bool, ...]
    tokens: int
    inpaints: bool


class _Tick:
    """One key's step recorded over a fixed batch."""

    def __init__(self, pipeline: Pipeline, fixed: DenoiseBatch, pool, record: Record):
        self.fixed = fixed
        self._loaded = None  # a weak reference to the batch whose whole state is in ``fixed``
        # ``advance`` leaves the fixed batch as it is, so the warm-ups need nothing put back
        self.graph, self.out = record(lambda: pipeline.advance(fixed), pool)

    def advance(self, batch: DenoiseBatch) -> Tensor:
        """``Pipeline.advance(batch)`` through the graph: the batch's next latents, its own copy."""
        n = batch.length  # the fixed batch's frames beyond are masked and stay zero
        if self._loaded is not None and self._loaded() is batch:
            self.fixed.z[..., :n].copy_(batch.z)
            self.fixed.index.copy_(batch.index)
        else:
            self.fixed.load(batch)
            self._loaded = weakref.ref(batch)
        self.graph.replay()
        return self.out[..., :n].clone()


class TickGraphs:
    """The ticks of a pipeline's running batches, one recorded graph per ``TickKey`` (``record``: a CUDA capture;
    the pipeline's batches must live on a CUDA device unless another recorder is given)."""

    def __init__(self, pipeline: Pipeline, token_multiple: int = 16, frame_multiple: int = 32, max_graphs: int = 32,
                 capture_after: int = 2, record: Record | None = None):
        if record is None and torch.device(pipeline.networks.batch_device).type != "cuda":
            raise ValueError(f"tick graphs need a CUDA device; model {pipeline.config.name} keeps its batches on "
                             f"{pipeline.networks.batch_device} (set TTA_DEVICE=cuda)")
        self.pipeline = pipeline
        self.token_multiple, self.frame_multiple, self.capture_after = token_multiple, frame_multiple, capture_after
        self.record = record if record is not None else capture
        self.sightings = Sightings()  # by key: the batch objects that stepped with it
        self._counted: weakref.WeakSet[DenoiseBatch] = weakref.WeakSet()
        self.graphs: GraphCache[TickKey, _Tick] = GraphCache(max_graphs)

    def key(self, batch: DenoiseBatch) -> TickKey:
        self.pipeline.prime(batch)  # the guided rows' conditioning: part of the state, and of the token count
        return TickKey(len(batch), round_up(batch.length, self.frame_multiple), batch.grids.shape[1],
                       tuple(i in batch.memo["guided_rows"] for i in range(len(batch))),
                       round_up(batch.tokens, self.token_multiple), batch.keep_known is not None)

    @torch.inference_mode()
    def step(self, batch: DenoiseBatch) -> bool:
        """``Pipeline.step(batch)`` through the key's graph, once ``capture_after`` batch objects of the key have
        stepped (True); before that, nothing (False: the caller steps the batch itself)."""
        key = self.key(batch)
        if batch not in self._counted:
            self._counted.add(batch)
            self.sightings.see(key)
        if key not in self.graphs and self.sightings.count(key) < self.capture_after:
            return False
        self.pipeline.take_step(batch, self.graphs.get(key, partial(self._capture, key, batch)).advance(batch))
        return True

    def _capture(self, key: TickKey, batch: DenoiseBatch, pool) -> _Tick:
        fixed = DenoiseBatch(batch.trajectories, key.frames)  # its own tensors: the running batch stays its own
        self.pipeline.prime(fixed)
        fixed.pad_tokens(key.tokens)
        tick = _Tick(self.pipeline, fixed, pool, self.record)
        log.info("captured a tick", extra={"model": self.pipeline.config.name, "rows": key.rows,
                                           "frames": key.frames, "width": key.width, "tokens": key.tokens,
                                           "graphs": len(self.graphs) + 1})
        return tick
