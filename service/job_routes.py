"""The asynchronous jobs API, beside the synchronous ``POST /generate`` and on the same engine and queue bound:

- ``POST /jobs``: the ``/generate`` body (JSON or multipart) and an optional ``webhook`` -> 202, the job's status
  and links (``Location``: its status);
- ``GET /jobs/{id}``: where it stands (queued with its position, running at step i of n, decoding, done, failed,
  cancelled), its timings;
- ``GET /jobs/{id}/events``: Server-Sent Events, replayed from the start (or after ``Last-Event-ID``): ``queued``
  (position), ``running``, one ``step`` per denoising step in order, ``decoding``, then one of ``done`` (the result's
  link), ``failed``, ``cancelled``;
- ``GET /jobs/{id}/result``: the audio in the format asked for (410 once expired);
- ``DELETE /jobs/{id}``: cancels (its sample leaves its batch at the engine's next tick); a finished job's result is
  discarded.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.audio import AUDIO_CONTENT, encode_audio
from service.errors import OVER_CAPACITY, UNKNOWN_JOB, ApiError, error_responses
from service.forms import read_generate_request, request_body_openapi
from service.gateway import JobSpec, api_error, resolve_request, result_headers
from service.job_store import JobRecord, JobStore, finished_status, owner_of, timings_of
from service.jobs import EngineError, JobResult
from service.schemas import JobInfo, JobRequest
from service.webhooks import check_webhook, deliver

log = logging.getLogger("tta.http")
KEEPALIVE_S = 15.0  # an SSE comment line this often while nothing happens (proxies close silent streams)


def install_job_routes(app: FastAPI, state, require_api_key: Callable, require_ready: Callable) -> JobStore:
    """Adds the routes to ``app`` (``state``: the app's ``ServiceState``) and returns their store."""
    settings, metrics = state.settings, state.metrics
    store = JobStore(metrics, settings.job_ttl, settings.job_result_bytes, settings.max_jobs)
    tasks: set[asyncio.Task] = set()  # the finishing tasks (encode, webhook), kept from the garbage collector

    def position(record: JobRecord) -> int | None:
        engine = state.engine
        if record.status != "queued" or record.generation is None or engine is None:
            return None
        return engine.position(record.generation)

    async def complete(record: JobRecord, spec: JobSpec, result: JobResult | None, error: BaseException | None,
                       fmt: str) -> None:
        if error is None:
            try:
                data, media_type = await asyncio.to_thread(encode_audio, result.wave, result.sample_rate, fmt,
                                                           settings.mp3_bitrate_kbps)
            except Exception as exc:  # noqa: BLE001 - this job fails, the server carries on
                log.error("job result encoding failed", exc_info=(type(exc), exc, exc.__traceback__),
                          extra={"job_id": record.id})
                store.finish(record, "failed", error=ApiError(500, "internal_error", "encoding the audio failed; "
                                                              "the server log has the details"))
            else:
                store.finish(record, "done", result=(data, media_type, result_headers(record.id, spec,
                                                                                       result.timings)),
                             timings=timings_of(result))
                metrics.audio_seconds.labels(record.model).inc(record.duration)
        else:
            why = api_error(error) if isinstance(error, EngineError) else ApiError(
                500, "internal_error", "generation failed; the server log has the details")
            store.finish(record, finished_status(why), error=why)
        log.info("job finished", extra={"job_id": record.id, "model": record.model, "status": record.status})
        if record.webhook_url:
            record.webhook = {"state": "pending", "attempts": 0, "http_status": None}
            record.webhook = await deliver(record.webhook_url, record.info(), settings.webhook_secret)

    def spawn(coro) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @app.post("/jobs", tags=["jobs"], status_code=202, response_model=JobInfo,
              responses=error_responses(401, 404, 408, 413, 422, 429, 503),
              openapi_extra={"requestBody": request_body_openapi(JobRequest)})
    async def create_job(request: Request, key: str | None = Depends(require_api_key), st=Depends(require_ready)):
        """Queue a generation and answer at once (202): the same fields as ``POST /generate`` (JSON, or a multipart
        form with ``init_audio`` as a file) and ``webhook``. Follow it with ``GET /jobs/{id}/events``."""
        arrival = request.state.arrival
        body, clip = await read_generate_request(request, settings.max_upload_bytes, JobRequest)
        webhook = check_webhook(body.webhook, settings.webhook_host_list) if body.webhook else None
        spec = await asyncio.to_thread(resolve_request, body, st.engine.pipelines, settings.default_model, clip)
        sample = spec.sample
        request.state.model = spec.model
        record = store.create(owner=owner_of(key), model=spec.model, seed=sample.seed, steps=sample.steps,
                              duration=sample.duration, fmt=body.format, webhook_url=webhook)
        request.state.log = {"job_id": record.id, "duration_s": sample.duration, "steps": sample.steps,
                             "seed": sample.seed, "modes": sample.modes}
        loop = asyncio.get_running_loop()

        def on_progress(event: str, data: dict) -> None:  # the engine's thread
            loop.call_soon_threadsafe(store.progress, record, event, data)

        def on_done(result, error) -> None:  # the engine's thread
            loop.call_soon_threadsafe(spawn, complete(record, spec, result, error, body.format))

        timeout = min(body.timeout or settings.job_timeout, settings.job_timeout)
        try:
            record.generation = st.gateway.submit(spec, record.id, timeout, arrival, on_done, on_progress)
        except ApiError:
            store.discard(record)
            raise
        where = position(record)
        store.emit(record, "queued", position=where)
        return JSONResponse(record.info(where), status_code=202, headers={"Location": f"/jobs/{record.id}"})

    # the routes of one job: 404 for an unknown id (or another key's job); they need no readiness, so their 503 is the
    # connection limit's alone
    job_errors = {"descriptions": {404: UNKNOWN_JOB, 503: OVER_CAPACITY}}

    @app.get("/jobs/{job_id}", tags=["jobs"], response_model=JobInfo,
             responses=error_responses(401, 404, 503, **job_errors))
    async def job_status(job_id: str, key: str | None = Depends(require_api_key)):
        record = store.get(job_id, owner_of(key))
        return record.info(position(record))

    @app.get("/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events: queued, running, step (one per denoising step), "
                                             "decoding, then done / failed / cancelled"},
                        **error_responses(401, 404, 503, **job_errors)})
    async def job_events(job_id: str, request: Request, key: str | None = Depends(require_api_key)):
        record = store.get(job_id, owner_of(key))
        try:
            after = int(request.headers.get("last-event-id", "-1"))
        except ValueError:
            after = -1

        async def queue_moves() -> None:  # a queued job's position, as it changes
            where = position(record)
            last = next((e.data.get("position") for e in reversed(record.events) if e.name == "queued"), None)
            if where is not None and where != last and record.status == "queued":
                store.emit(record, "queued", position=where)

        async def stream():
            async for event in store.events(record, after, KEEPALIVE_S, poll=queue_moves):
                if event is None:
                    yield b": keep-alive\n\n"
                else:
                    data = json.dumps(event.data, separators=(",", ":"))
                    yield f"id: {event.id}\nevent: {event.name}\ndata: {data}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/jobs/{job_id}/result", tags=["jobs"], response_class=Response,
             responses={200: {"content": AUDIO_CONTENT}, **error_responses(401, 404, 409, 410, 503, **job_errors)})
    async def job_result(job_id: str, key: str | None = Depends(require_api_key)):
        """The audio of a done job (409 while it is unfinished, or when it failed or was cancelled; 410 once its
        result has expired or was discarded)."""
        record = store.get(job_id, owner_of(key))
        if record.status == "done":
            if record.result is None:
                raise ApiError(410, "job_expired", f"the result of job {job_id} has expired or was discarded (results "
                               f"are kept {settings.job_ttl:g} s)")
            return Response(record.result, media_type=record.media_type, headers=record.headers)
        if not record.final:
            where = "" if record.status == "running" else f", position {position(record)} in the queue"
            raise ApiError(409, "job_not_finished", f"job {job_id} is {record.status} (step {record.step} of "
                           f"{record.steps}{where}); GET /jobs/{job_id}/events follows it",
                           headers={"Retry-After": "1"})
        e = record.error or {}
        raise ApiError(409, f"job_{record.status}", f"job {job_id} {record.status}: {e.get('code')}: "
                       f"{e.get('message')}")

    @app.delete("/jobs/{job_id}", tags=["jobs"], response_model=JobInfo,
                responses={200: {"description": "a finished job: its result discarded"},
                           202: {"model": JobInfo, "description": "an unfinished job: cancelled at the engine's "
                                 "next tick"},
                           **error_responses(401, 404, 408, 413, 503, **job_errors)})
    async def cancel_job(job_id: str, key: str | None = Depends(require_api_key)):
        """Cancel an unfinished job (202: it leaves its batch at the engine's next tick, then its status is
        cancelled); for a finished one, discard its result (200)."""
        record = store.get(job_id, owner_of(key))
        if record.final:
            store.discard_result(record)
            return record.info()
        if state.engine is not None and record.generation is not None:
            state.engine.cancel(record.generation, "cancelled by its client")
        return JSONResponse(record.info(position(record)), status_code=202)

    return store
