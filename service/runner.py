"""The model runner: executes the three stages of a tick for one model through its pipeline, or a whole generation
in one call. No metrics, no policy, no request state; its only state is the pipeline, the current ``DenoiseBatch``
of each length group, and the whole-generation and tick graphs."""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from models.generation_graph import WholeGeneration, WholeResult
from models.pipeline import DenoiseBatch, Pipeline, SampleRequest, guided_first
from models.tick_graph import TickGraphs
from service.jobs import GenerationJob, Sample
from service.runtimes import Runtime

log = logging.getLogger("tta.engine")


class ModelRunner:
    def __init__(self, runtime: Runtime, whole_generation: bool = False, tick_graphs: bool = False):
        self.rt = runtime
        self.pipeline = Pipeline(runtime)
        self._batches: list[DenoiseBatch] = []  # one per length group of the last tick
        # whole generations in one call (one CUDA graph on a GPU) for admitted sets that qualify
        self.whole = WholeGeneration(self.pipeline) if whole_generation else None
        # each tick's forward and sampler step as one CUDA graph, for a runtime whose batches live on the GPU (not
        # ONNX Runtime's or TensorRT's, which take host feeds)
        self.ticks = None
        if tick_graphs:
            if runtime.batch_device.type == "cuda":
                self.ticks = TickGraphs(self.pipeline)
            else:
                log.warning("tick graphs need the model's batches on a CUDA device; model %s (%s runtime) keeps them "
                            "on %s and steps without them", runtime.model_name, runtime.name, runtime.batch_device)

    def wants_whole(self, jobs: list[GenerationJob]) -> bool:
        """Whether these jobs should run as one whole generation (``WholeGeneration.wants``)."""
        return self.whole is not None and self.whole.wants([sample_request(j) for j in jobs])

    def generate_whole(self, jobs: list[GenerationJob]) -> WholeResult:
        """These jobs from start to 16-bit PCM in one call (``models.generation_graph``)."""
        return self.whole([sample_request(j) for j in jobs])

    def encode(self, jobs: list[GenerationJob], now: float) -> list[Sample]:
        """The jobs' samples at their first step: ONE batched text-encoder call (the encoder caches prompts)."""
        t0 = time.perf_counter()
        trajectories = self.pipeline.start([sample_request(j) for j in jobs])
        elapsed = time.perf_counter() - t0
        start = time.perf_counter()
        return [Sample(job, tr.frames, now, tr, encode_s=elapsed, denoise_start=start)
                for job, tr in zip(jobs, trajectories)]

    def batch(self, samples: list[Sample]) -> DenoiseBatch:
        """The batch tensors for this group of samples: the previous tick's when nobody joined or left, else
        rebuilt. With tick graphs the guided samples come first, so that a batch's shape names how many rows are
        guided rather than which (a sample's result depends on its row by float rounding only)."""
        trajectories = [s.trajectory for s in samples]
        if self.ticks is not None:
            trajectories = [trajectories[i] for i in guided_first([tr.request for tr in trajectories])]
        for b in self._batches:
            if b.holds(trajectories):
                return b
        return DenoiseBatch(trajectories)

    def keep(self, batches: list[DenoiseBatch]) -> None:
        """The batches of this tick, for the next one (the others are freed)."""
        self._batches = batches

    def release(self) -> None:
        """Drop the cached batches (after a failed tick, or when the denoise set empties)."""
        self._batches = []

    def denoise_step(self, samples: list[Sample]) -> DenoiseBatch:
        """One pipeline step over these samples (one denoiser forward); returns the batch, for ``keep``."""
        b = self.batch(samples)
        if not self._step_graphed(b):
            self.pipeline.step(b)
        for s in samples:
            s.job.steps_done = s.trajectory.index
            if s.finished:
                s.denoise_end = time.perf_counter()
        return b

    def graph_captures(self) -> dict[str, int]:
        """CUDA graphs captured so far for this model, by kind: the runtime's ("forward"), the tick graphs' ("tick")
        and the whole generations' ("whole"), those in use."""
        out = dict(self.rt.graph_captures())
        if self.ticks is not None:
            out["tick"] = self.ticks.graphs.captures
        if self.whole is not None and self.whole.record is not None:
            out["whole"] = self.whole.graphs.captures
        return out

    def _step_graphed(self, b: DenoiseBatch) -> bool:
        """Step ``b`` through its tick graph (``TickGraphs.step``); False when it is left to the plain step. A tick
        graph that raises (a capture the device refuses, say) turns them off for this model: the batch, untouched
        but for its prompts' padding, takes the plain step, and so do all later ones."""
        if self.ticks is None:
            return False
        try:
            return self.ticks.step(b)
        except Exception:  # noqa: BLE001 - the step path answers; the cause is logged
            log.exception("tick graph failed for model %s; its ticks run without one from now on", self.rt.model_name)
            self.ticks = None
            return False

    def settle(self, samples: list[Sample]) -> None:
        """On a GPU, wait until the device has run these samples' steps (queued without waiting) and end their
        denoising time there, so that a request's denoise and decode timings each hold their own work; the decode
        that follows would wait for them anyway. A CPU ran them already."""
        device = self.rt.batch_device
        if device.type != "cuda":
            return
        torch.cuda.synchronize(device)
        end = time.perf_counter()
        for s in samples:
            s.denoise_end = end

    def decode(self, samples: list[Sample]) -> list[Tensor]:
        return self.pipeline.decode([s.trajectory.z for s in samples], [s.job.duration for s in samples])


def sample_request(job: GenerationJob) -> SampleRequest:
    """What the pipeline is asked to make for this job."""
    return SampleRequest(job.prompt, job.duration, job.steps, job.guidance, job.seed, job.negative_prompt,
                         job.init_audio, job.init_noise_level, job.inpaint)
