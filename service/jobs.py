"""The request types the HTTP layer, the engine and the scheduler share: a generation job, its state and result, the
running sample that carries it through the denoise set, and the errors a job can end with."""
from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from models.pipeline import Trajectory

log = logging.getLogger("tta.engine")

# ---------------------------------------------------------------------------------------------------- errors
class EngineError(Exception):
    """A job's end other than success: ``status`` and ``code`` are what the HTTP layer answers with."""

    code = "internal_error"
    status = 500


class QueueFull(EngineError):
    code, status = "queue_full", 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineUnreachable(QueueFull):
    """Refused at admission: the work already queued and running leaves too little time before the request's
    deadline (a 429: it may succeed once the queue is shorter)."""

    code = "deadline_unreachable"


class DeadlineExceeded(EngineError):
    code, status = "timeout", 504


class Cancelled(EngineError):
    code, status = "client_closed_request", 499


class BatchFailed(EngineError):
    """A stage raised for the batch this job was in; the message is safe to show a client (no internals), the
    cause is kept for the log."""

    code, status = "internal_error", 500


class ShuttingDown(EngineError):
    code, status = "not_ready", 503


# ---------------------------------------------------------------------------------------------------- jobs
class JobState(str, enum.Enum):
    WAITING = "waiting"  # submitted, not yet admitted into the denoise set
    RUNNING = "running"  # admitted: encoded, taking steps, or being decoded
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by the client, or its deadline passed

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobResult:
    latents: Tensor  # [C, frames]
    wave: Tensor  # [2, round(duration * sample_rate)] float
    sample_rate: int
    timings: dict[str, float]  # seconds: queue, encode, denoise, decode
    steps_done: int


@dataclass(eq=False)
class GenerationJob:
    """One request = one sample. ``on_done(result, error)`` is called exactly once, by ``resolve``, from the engine
    thread (or from whoever cancels first); the HTTP layer's callback hops back to the event loop. ``on_progress(event,
    data)``, when set, hears the engine's progress from its thread: "running" (admitted), "step" (one per denoising
    step, in order), "decoding"."""

    id: str
    model: str
    prompt: str
    duration: float
    steps: int
    guidance: float
    seed: int
    deadline: float  # time.monotonic() by which the answer is due
    on_done: Callable[[JobResult | None, BaseException | None], Any]
    negative_prompt: str | None = None
    init_audio: Tensor | None = None  # [2, N] float at the model's sample rate (audio-to-audio, inpainting)
    init_noise_level: float = 1.0
    inpaint: tuple[float, float] | None = None  # seconds regenerated, the rest of init_audio kept
    arrival: float = field(default_factory=time.monotonic)
    state: JobState = JobState.WAITING
    cancel_reason: str | None = None
    steps_done: int = 0
    on_progress: Callable[[str, dict], Any] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self, reason: str) -> None:
        """Thread-safe flag; the scheduler drops the job at its next tick, so it stops consuming steps."""
        self.cancel_reason = self.cancel_reason or reason

    def progress(self, event: str, **data) -> None:
        """Tell ``on_progress`` (the engine's thread); a listener's fault is logged, never the engine's."""
        if self.on_progress is None or self.state.final:
            return
        try:
            self.on_progress(event, data)
        except Exception:  # noqa: BLE001 - e.g. the listener's event loop has closed
            log.exception("progress listener of request %s failed", self.id)

    def resolve(self, result: JobResult | None = None, error: BaseException | None = None) -> bool:
        """The job's one terminal transition (thread-safe; False when it had already ended)."""
        with self._lock:
            if self.state.final:
                return False
            if error is None:
                self.state = JobState.DONE
            elif isinstance(error, (Cancelled, DeadlineExceeded)):
                self.state = JobState.CANCELLED
            else:
                self.state = JobState.FAILED
        self.on_done(result, error)
        return True

    @property
    def resolved(self) -> bool:
        return self.state.final


@dataclass(eq=False)
class Sample:
    """A running job in the denoise set: what the scheduler reads (its length in latent frames, its progress in
    ``job.steps_done``) and what the runner advances (``trajectory``, the pipeline's denoising state)."""

    job: GenerationJob
    frames: int
    admitted: float
    trajectory: Trajectory | None = None
    encode_s: float = 0.0
    denoise_start: float = 0.0
    denoise_end: float = 0.0

    @property
    def remaining(self) -> int:
        return self.job.steps - self.job.steps_done

    @property
    def finished(self) -> bool:
        return self.job.steps_done >= self.job.steps
