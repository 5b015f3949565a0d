"""Between the HTTP routes and the engine: a validated request becomes a job with the model's defaults and limits
(``resolve_request``, which the offline CLI uses too), and ``Gateway.run`` submits it, awaits it on the event loop
within its deadline, cancels it when the client goes away, and maps every way a job can end to an ``ApiError``."""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

from models.pipeline import Pipeline, RequestError, SampleRequest
from fastapi import Request
from fastapi.responses import Response

from service.audio import DEFAULT_MP3_BITRATE_KBPS, AudioInputError, decode_audio, encode_audio
from service.engine import Engine
from service.errors import ApiError
from service.jobs import Cancelled, EngineError, GenerationJob, JobResult, QueueFull
from service.schemas import GenerateRequest


@dataclass(frozen=True)
class JobSpec:
    """A request with every default filled in from its model's config: the model and what its sample is asked to
    be."""

    model: str
    sample: SampleRequest

    def job_fields(self) -> dict:
        """``GenerationJob``'s request fields."""
        return {"model": self.model, **{f.name: getattr(self.sample, f.name) for f in fields(SampleRequest)}}

    def job(self, request_id: str, deadline: float, on_done, arrival: float) -> GenerationJob:
        return GenerationJob(id=request_id, deadline=deadline, on_done=on_done, arrival=arrival, **self.job_fields())


def resolve_request(body: GenerateRequest, pipelines: dict[str, Pipeline], default_model: str,
                    init_audio: bytes | None = None) -> JobSpec:
    """The job a request asks for: its model (404 when unknown), the model's defaults for what it leaves out, the
    model's limits and modes (422 naming the field), the init clip decoded at the model's sample rate (``init_audio``:
    the uploaded file's bytes). A missing seed is drawn here, so the answer can report it."""
    name = body.model or default_model
    pipeline = pipelines.get(name)
    if pipeline is None:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}; GET /models lists {sorted(pipelines)}",
                       field="model")
    cfg = pipeline.config
    duration = cfg.default_duration if body.duration is None else body.duration
    if duration > cfg.max_duration:
        raise ApiError(422, "invalid_input", f"duration: {duration} s exceeds model {name}'s maximum of "
                       f"{cfg.max_duration} s", field="duration")
    steps = cfg.default_steps if body.steps is None else body.steps
    if steps > cfg.max_steps:
        raise ApiError(422, "invalid_input", f"steps: {steps} exceeds model {name}'s maximum of {cfg.max_steps}",
                       field="steps")
    guidance = cfg.default_guidance if body.guidance is None else body.guidance
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    try:
        inpaint = body.inpaint
    except ValueError as exc:
        raise ApiError(422, "invalid_input", f"inpaint_end: {exc}", field="inpaint_end") from None
    wave = None
    if init_audio is not None:
        try:
            wave = decode_audio(init_audio, pipeline.sample_rate, max_seconds=duration)
        except AudioInputError as exc:
            raise ApiError(422, "invalid_input", str(exc), field="init_audio") from None
    sample = SampleRequest(body.prompt, float(duration), int(steps), float(guidance), int(seed), body.negative_prompt,
                           wave, 1.0 if body.init_noise_level is None else float(body.init_noise_level), inpaint)
    try:
        pipeline.check(sample)
    except RequestError as exc:
        raise ApiError(422, "invalid_input", str(exc), field=exc.field) from None
    return JobSpec(name, sample)


def result_headers(request_id: str, spec: JobSpec, timings: dict[str, float]) -> dict[str, str]:
    """What a generated clip's response says about it: the request id, the seed, model, steps and guidance it was
    made with, and where its time went (``Server-Timing``, milliseconds)."""
    sample = spec.sample
    server_timing = ", ".join(f"{k};dur={timings[k] * 1000:.2f}" for k in ("queue", "encode", "denoise", "decode"))
    return {"X-Request-Id": request_id, "X-Seed": str(sample.seed), "X-Model": spec.model,
            "Server-Timing": server_timing, "X-Steps": str(sample.steps), "X-Guidance": f"{sample.guidance:g}"}


def api_error(exc: EngineError) -> ApiError:
    """How a job's end other than success is answered: a 503 (shutting down) says when to retry."""
    return ApiError(exc.status, exc.code, str(exc), headers={"Retry-After": "5"} if exc.status == 503 else None)


class Gateway:
    """The asyncio side of one engine."""

    def __init__(self, engine: Engine, request_timeout: float, mp3_bitrate_kbps: int = DEFAULT_MP3_BITRATE_KBPS,
                 disconnect_poll_s: float = 0.05):
        self.engine = engine
        self.request_timeout = request_timeout
        self.mp3_bitrate_kbps = mp3_bitrate_kbps
        self.disconnect_poll_s = disconnect_poll_s

    async def respond(self, request: Request, spec: JobSpec, fmt: str, timeout: float | None,
                      **log_fields) -> Response:
        """A synchronous route's answer: run the job within ``timeout`` (the request's own, capped by the server's)
        and answer with its audio in ``fmt`` and the ``result_headers``; what the accounting middleware records
        (model, log fields, audio seconds) is left in ``request.state``."""
        rid = request.state.request_id
        sample = spec.sample
        request.state.model = spec.model
        request.state.log = {"duration_s": sample.duration, "steps": sample.steps, "guidance": sample.guidance,
                             "seed": sample.seed, "modes": sample.modes, **log_fields}
        request.state.submitted = True
        result = await self.run(spec, rid, self.timeout(timeout), request.state.arrival, request.is_disconnected)
        data, media_type = await asyncio.to_thread(encode_audio, result.wave, result.sample_rate, fmt,
                                                   self.mp3_bitrate_kbps)
        request.state.audio_seconds = sample.duration
        request.state.log.update({f"{k}_ms": round(v * 1000, 2) for k, v in result.timings.items()})
        return Response(content=data, media_type=media_type, headers=result_headers(rid, spec, result.timings))

    def timeout(self, asked: float | None) -> float:
        """A request's deadline in seconds: what it asks for, capped by the server's."""
        return min(asked or self.request_timeout, self.request_timeout)

    def submit(self, spec: JobSpec, request_id: str, timeout: float, arrival: float,
               on_done: Callable[[JobResult | None, BaseException | None], None],
               on_progress: Callable[[str, dict], None] | None = None) -> GenerationJob:
        """Queue the job (429 when the queue is full, 503 when shutting down); ``on_done`` / ``on_progress`` are
        called from the engine's thread."""
        job = spec.job(request_id, arrival + timeout, on_done, arrival)
        job.on_progress = on_progress
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineError as exc:
            raise api_error(exc) from None
        return job

    async def run(self, spec: JobSpec, request_id: str, timeout: float, arrival: float,
                  is_disconnected: Callable[[], Awaitable[bool]]) -> JobResult:
        """Submit the job and wait for its result; every other ending raises ``ApiError``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(result: JobResult | None, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        def on_done(result, error):  # the engine's thread, or this loop's (a disconnect)
            loop.call_soon_threadsafe(settle, result, error)

        job = self.submit(spec, request_id, timeout, arrival, on_done)
        watcher = asyncio.create_task(self._watch(job, is_disconnected))
        try:
            return await asyncio.wait_for(fut, timeout=max(0.0, job.deadline - time.monotonic()))
        except asyncio.CancelledError:  # a server in front cancelled the request (Ray Serve when its client leaves)
            job.cancel("cancelled")
            raise
        except asyncio.TimeoutError:
            job.cancel("timeout")
            raise ApiError(504, "timeout", f"request {request_id} did not finish within its {timeout:g} s "
                           "deadline") from None
        except EngineError as exc:
            raise api_error(exc) from None
        finally:
            watcher.cancel()

    async def _watch(self, job: GenerationJob, is_disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Cancels the job when the client goes away: its sample leaves the batch at the next tick."""
        while not job.resolved:
            if await is_disconnected():
                job.cancel("client disconnected")
                job.resolve(None, Cancelled(f"client of request {job.id} disconnected"))
                return
            await asyncio.sleep(self.disconnect_poll_s)
