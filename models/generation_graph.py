"""A whole generation replayed as one CUDA graph: every denoising step, the decode, the conversion to 16-bit PCM and
the copy into pinned host memory, for a batch of requests that share a step count and a length (the low-load and
benchmark case; Stable Audio 3's TensorRT pipeline runs a generation the same way).

The graph records the pipeline's own calls (``Pipeline.run`` over a ``DenoiseBatch``, the grouped decode) made over
a batch held in fixed tensors. Replaying it for new requests starts them as usual (``Pipeline.start``: the text
encoder with its prompt cache, and every random number, on the host), copies their starting state (latents, the
pre-drawn step noise, conditioning, guidance scales) into the fixed batch (``DenoiseBatch.load``) and replays. So a
seed gives the audio the step-by-step path gives, up to the float rounding of prompts padded to the graph's token
count. The text encoder stays outside the graph: a prompt seen before costs nothing there, and a new one is one
encoder call.

A graph belongs to its ``GraphKey`` (rows, latent frames, steps, which rows are guided, token count rounded up to
``token_multiple``); the ``max_graphs`` most recently used are kept. The requests run guided ones first
(``guided_first``), so that a mix of guided and unguided requests meets one key per count of guided rows, whatever
their order; their answers come back in the order asked. Requests qualify when none carries init audio
(text-to-audio, with or without a negative prompt) and all share steps and latent frames (``qualifies``); the engine
runs them whole once their shape has been met ``capture_after`` times (``wants``: on a GPU the second time, so that
a clip length met once does not pay for a capture).

Without CUDA there is no graph: the same program (``run_whole``) runs eagerly over the requests' own batch, which is
what the CPU tests compare with the step-by-step path (and ``DenoiseBatch.load``, the replay's one extra part, with
stepping the loaded batch itself). Stable Audio's DiTs keep per-request results by tensor identity
(``RequestCache``); a capture bypasses that cache, so the graph recomputes them from the fixed batch at every replay.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from models.audio.pcm import pcm16
from models.cuda_capture import GraphCache, Record, Sightings, capture, round_up
from models.pipeline import DenoiseBatch, Pipeline, SampleRequest, decode_batch_limit, decode_grouped, guided_first

log = logging.getLogger("tta.generation_graph")


@dataclass
class WholeResult:
    """Per request: its int16 clip [2, round(duration x sample rate)] and its final latents [C, frames], on the
    host; and the seconds spent starting the requests (text encoding, noise) and running the generation."""

    pcm: list[Tensor]
    latents: list[Tensor]
    start_s: float
    run_s: float


@dataclass
class _Host:
    """Where a run's results land: PCM [rows, 2, samples] int16 and latents [rows, C, frames], pinned when the batch
    is on a GPU (so that the graph's copies are asynchronous)."""

    pcm: Tensor
    latents: Tensor

    @classmethod
    def like(cls, batch: DenoiseBatch, samples_per_latent: int) -> _Host:
        pin = batch.device.type == "cuda"
        return cls(torch.empty(len(batch), 2, samples_per_latent * batch.length, dtype=torch.int16, pin_memory=pin),
                   torch.empty(batch.z.shape, dtype=batch.z.dtype, pin_memory=pin))


@dataclass(frozen=True)
class GraphKey:
    rows: int
    frames: int
    steps: int
    guided: tuple[bool, ...]
    tokens: int


def run_whole(pipeline: Pipeline, batch: DenoiseBatch, z: Tensor, host: _Host) -> None:
    """The recorded program: from latents ``z`` (the batch's starting latents), every step, the decode (the
    pipeline's grouping, full-length clips), the PCM and the final latents into ``host``."""
    batch.z = z
    for s in batch.trajectories:
        s.index = 0
    pipeline.run(batch.trajectories, batch)
    host.latents.copy_(batch.z, non_blocking=True)
    seconds = host.pcm.shape[-1] / pipeline.sample_rate
    waves = decode_grouped([s.z for s in batch.trajectories], [seconds] * len(batch), pipeline.sample_rate,
                           pipeline.networks.decode_on_device, decode_batch_limit(batch.device))
    host.pcm.copy_(pcm16(torch.stack(waves)), non_blocking=True)


class _Graph:
    """One key's program recorded over a fixed batch (``record``: ``capture`` on a CUDA device)."""

    def __init__(self, pipeline: Pipeline, batch: DenoiseBatch, host: _Host, pool, record=capture):
        self.batch, self.host = batch, host
        self.z = batch.z  # the starting latents: every replay begins from this tensor (``run`` loads it)
        state = [x.clone() for x in batch.state()]  # the warm-up steps the fixed batch: put back before capture
        self.graph, _ = record(lambda: run_whole(pipeline, batch, self.z, host), pool, warmups=1,
                               before_capture=lambda: self._load(state))

    def _load(self, state: list[Tensor]) -> None:
        # a run leaves the batch at its last step's latents: the state goes into the starting ones
        self.batch.z = self.z
        for a, b in zip(self.batch.state(), state):
            a.copy_(b)

    def run(self, batch: DenoiseBatch) -> _Host:
        self.batch.z = self.z
        self.batch.load(batch)
        self.graph.replay()
        if self.z.is_cuda:
            torch.cuda.current_stream().synchronize()
        return self.host


class WholeGeneration:
    """Whole generations of a pipeline: on CUDA one captured graph per ``GraphKey``, elsewhere the program run
eagerly."""

    def __init__(self, pipeline: Pipeline, token_multiple: int = 16, max_graphs: int = 8,
                 capture_after: int | None = None, record: Record | None = None):
        self.pipeline = pipeline
        cuda = torch.device(pipeline.networks.batch_device).type == "cuda"
        # how a key's program is recorded: a CUDA capture; None off CUDA, where the program runs eagerly
        self.record = record if record is not None else (capture if cuda else None)
        self.token_multiple = token_multiple
        # a shape is run whole from its capture_after-th sighting on: a capture costs several generations' time, so a
        # one-off shape (a clip length met once) is left to the step path; off CUDA there is nothing to capture
        self.capture_after = capture_after if capture_after is not None else (2 if cuda else 1)
        self.sightings = Sightings()
        self.graphs: GraphCache[GraphKey, _Graph] = GraphCache(max_graphs)

    def qualifies(self, requests: Sequence[SampleRequest]) -> bool:
        """No init audio, one step count and one latent length."""
        return bool(requests) and all(r.init_audio is None for r in requests) \
            and len({r.steps for r in requests}) == 1 \
            and len({self.pipeline.latent_frames(r.duration) for r in requests}) == 1

    def wants(self, requests: Sequence[SampleRequest]) -> bool:
        """Whether to run these requests whole now: they qualify and their shape (rows, frames, steps, how many are
        guided) has been met ``capture_after`` times, this time included."""
        if not self.qualifies(requests):
            return False
        shape = (len(requests), self.pipeline.latent_frames(requests[0].duration), requests[0].steps,
                 sum(r.guidance != 1.0 for r in requests))
        return self.sightings.see(shape) >= self.capture_after

    @torch.inference_mode()
    def __call__(self, requests: Sequence[SampleRequest]) -> WholeResult:
        if not self.qualifies(requests):
            raise ValueError("a whole-generation graph takes requests without init audio that share steps and "
                             "length")
        p = self.pipeline
        order = guided_first(requests)
        requests = [requests[i] for i in order]
        t0 = time.perf_counter()
        batch = DenoiseBatch(p.start(requests))
        p.prime(batch)
        key = GraphKey(len(batch), batch.length, batch.trajectories[0].steps,
                       tuple(r.guidance != 1.0 for r in requests), round_up(batch.tokens, self.token_multiple))
        batch.pad_tokens(key.tokens)
        t1 = time.perf_counter()
        if self.record is None:
            host = _Host.like(batch, p.networks.samples_per_latent)
            run_whole(p, batch, batch.z, host)
        else:
            host = self.graphs.get(key, partial(self._capture, key, batch)).run(batch)
        rows = sorted(range(len(order)), key=order.__getitem__)  # each request's row, in the order asked
        return WholeResult([host.pcm[i, :, : round(requests[i].duration * p.sample_rate)].clone() for i in rows],
                           [host.latents[i, :, : batch.trajectories[i].frames].clone() for i in rows],
                           t1 - t0, time.perf_counter() - t1)

    def _capture(self, key: GraphKey, batch: DenoiseBatch, pool) -> _Graph:
        fixed = DenoiseBatch(batch.trajectories)  # its own tensors: the request's batch stays the request's
        self.pipeline.prime(fixed)
        fixed.pad_tokens(key.tokens)
        host = _Host.like(fixed, self.pipeline.networks.samples_per_latent)
        graph = _Graph(self.pipeline, fixed, host, pool, self.record)
        log.info("captured a whole generation", extra={"model": self.pipeline.config.name, "rows": key.rows,
                                                       "frames": key.frames, "steps": key.steps,
                                                       "tokens": key.tokens, "graphs": len(self.graphs) + 1})
        return graph
