"""Asynchronous jobs (``POST /jobs``): each job's status, its progress as a replayable list of events (what
``GET /jobs/{id}/events`` streams), and its encoded result, kept for ``job_ttl`` seconds within ``job_result_bytes``.

Everything here runs on the event loop: the engine's callbacks (``on_progress``, ``on_done``, from its thread) hop
over with ``call_soon_threadsafe``. A job id is 128 random bits (unguessable); with API keys on, a job belongs to the
key that made it (a digest of it is kept, never the key) and is invisible (404) to any other."""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service.errors import ApiError
from service.jobs import EngineError, GenerationJob, JobResult
from service.metrics import Metrics

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")


@dataclass
class Event:
    id: int  # 0, 1, ... in order (the SSE id: a client resumes after the last it saw with Last-Event-ID)
    name: str  # queued, running, step, decoding, done, failed, cancelled
    data: dict


@dataclass(eq=False)
class JobRecord:
    id: str
    owner: str | None  # digest of the API key that made it
    model: str
    seed: int
    steps: int
    duration: float
    format: str
    webhook_url: str | None
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    step: int = 0
    stage: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] | None = None
    error: dict | None = None
    result: bytes | None = None
    media_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    result_expired: bool = False
    expires_at: float | None = None
    webhook: dict | None = None
    events: list[Event] = field(default_factory=list)
    generation: GenerationJob | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def info(self, queue_position: int | None = None) -> dict:
        """The job as ``GET /jobs/{id}`` shows it (``service.schemas.JobInfo``)."""
        base = f"/jobs/{self.id}"
        return {"id": self.id, "status": self.status, "model": self.model, "seed": self.seed, "steps": self.steps,
                "step": self.step, "stage": self.stage, "queue_position": queue_position,
                "duration": self.duration, "format": self.format, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at, "timings": self.timings,
                "error": self.error, "result_expired": self.result_expired, "expires_at": self.expires_at,
                "webhook": self.webhook,
                "links": {"self": base, "events": f"{base}/events", "result": f"{base}/result"}}


def owner_of(api_key: str | None) -> str | None:
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()


class JobStore:
    """The jobs of one app. ``ttl``: seconds a result is kept after the job ends (its status as long again);
    ``result_bytes``: the results' total size, beyond which the oldest expire first; ``max_jobs``: statuses kept
    (finished jobs are forgotten oldest first)."""

    def __init__(self, metrics: Metrics, ttl: float, result_bytes: int, max_jobs: int):
        self.metrics, self.ttl, self.result_bytes, self.max_jobs = metrics, ttl, result_bytes, max_jobs
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._bytes = 0
        self._counts = dict.fromkeys(STATES, 0)
        self._report()

    # ------------------------------------------------------------------ bookkeeping
    def _report(self) -> None:
        for state, n in self._counts.items():
            self.metrics.jobs.labels(state).set(n)
        self.metrics.job_result_bytes.set(self._bytes)

    def _set_status(self, record: JobRecord, status: str) -> None:
        self._counts[record.status] -= 1
        self._counts[status] += 1
        record.status = status
        self._report()

    def discard_result(self, record: JobRecord) -> None:
        """A finished job's result, discarded on its client's request (410 from then on)."""
        self._drop_result(record)

    def _drop_result(self, record: JobRecord) -> None:
        if record.result is not None:
            self._bytes -= len(record.result)
            record.result = None
        record.result_expired = True
        self._report()

    def expire(self, now: float | None = None) -> None:
        """Results past their time expire (410); statuses past twice the ttl, and the oldest finished ones beyond
        ``max_jobs``, are forgotten (404)."""
        now = time.time() if now is None else now
        for record in list(self._jobs.values()):
            if record.final and record.finished_at is not None:
                if not record.result_expired and now >= record.finished_at + self.ttl:
                    self._drop_result(record)
                if now >= record.finished_at + 2 * self.ttl:
                    self._forget(record)
        finished = [r for r in self._jobs.values() if r.final]
        for record in finished[:max(0, len(self._jobs) - self.max_jobs)]:
            self._forget(record)

    def _forget(self, record: JobRecord) -> None:
        self._drop_result(record)
        self._counts[record.status] -= 1
        del self._jobs[record.id]
        self._report()

    # ------------------------------------------------------------------ lifecycle
    def create(self, *, owner: str | None, model: str, seed: int, steps: int, duration: float, fmt: str,
               webhook_url: str | None) -> JobRecord:
        self.expire()
        record = JobRecord(id=secrets.token_urlsafe(16), owner=owner, model=model, seed=seed, steps=steps,
                           duration=duration, format=fmt, webhook_url=webhook_url)
        self._jobs[record.id] = record
        self._counts["queued"] += 1
        self._report()
        return record

    def discard(self, record: JobRecord) -> None:
        """A job that never reached the engine (its submission was refused)."""
        if record.id in self._jobs:
            self._forget(record)

    def get(self, job_id: str, owner: str | None) -> JobRecord:
        self.expire()
        record = self._jobs.get(job_id)
        if record is None or record.owner != owner:  # another key's job looks like no job at all
            raise ApiError(404, "unknown_job", f"no job {job_id!r} (it may have been forgotten: a finished job's "
                           "status is kept for twice the result's time)")
        return record

    def emit(self, record: JobRecord, name: str, **data) -> None:
        record.events.append(Event(len(record.events), name, data))
        record.changed.set()
        record.changed = asyncio.Event()

    def progress(self, record: JobRecord, event: str, data: dict) -> None:
        """The engine's progress (on the loop): running, every step, decoding."""
        if record.final:
            return
        if event == "running":
            self._set_status(record, "running")
            record.started_at, record.stage = time.time(), "denoising"
        elif event == "step":
            record.step = int(data["step"])
        elif event == "decoding":
            record.stage = "decoding"
        self.emit(record, event, **data)

    def finish(self, record: JobRecord, status: str, *, error: ApiError | None = None,
               result: tuple[bytes, str, dict] | None = None, timings: dict | None = None) -> None:
        """The job's one end: done with its encoded audio (bytes, media type, response headers), failed or cancelled
        with the error ``/generate`` would have answered."""
        if record.final:
            return
        self._set_status(record, status)
        record.finished_at, record.stage, record.timings = time.time(), "finished", timings
        record.generation = None  # the engine's job (its init clip, its callbacks) is not kept with the status
        record.expires_at = record.finished_at + self.ttl
        if result is not None:
            record.result, record.media_type, record.headers = result
            self._bytes += len(record.result)
            self._report()
            self._keep_within_budget(record)
        if error is not None:
            record.error = {"status": error.status, "code": error.code, "message": error.message}
        data = {"status": status, "timings": timings}
        if status == "done":
            data["result"] = f"/jobs/{record.id}/result"
        if record.error:
            data["error"] = record.error
        self.emit(record, status, **data)
        self.expire()

    def _keep_within_budget(self, newest: JobRecord) -> None:
        for record in list(self._jobs.values()):
            if self._bytes <= self.result_bytes:
                return
            if record.result is not None and record is not newest:
                self._drop_result(record)
        if self._bytes > self.result_bytes:  # the newest alone is over the budget
            self._drop_result(newest)

    async def events(self, record: JobRecord, after: int = -1, keepalive_s: float = 15.0,
                     poll: Callable[[], Awaitable[None]] | None = None):
        """The job's events after id ``after``, as they come, ending with its final one; None items are keep-alive
        ticks (nothing happened for ``keepalive_s``). ``poll`` runs between waits (the queue position)."""
        sent, quiet_since = after + 1, time.monotonic()
        while True:
            while sent < len(record.events):
                event = record.events[sent]
                sent += 1
                quiet_since = time.monotonic()
                yield event
                if event.name in FINAL:
                    return
            if record.final:
                return
            changed = record.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=keepalive_s if poll is None else min(1.0, keepalive_s))
            except asyncio.TimeoutError:
                if poll is not None:
                    await poll()
                if sent >= len(record.events) and time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield None


def finished_status(error: EngineError) -> str:
    """How a job that did not succeed is shown: cancelled (by its client, or its deadline) or failed."""
    return "cancelled" if error.status == 499 else "failed"


def timings_of(result: JobResult) -> dict[str, float]:
    return {k: round(v, 6) for k, v in result.timings.items()}
