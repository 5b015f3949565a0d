"""The FastAPI app: thin routes over the engine. ``create_app(settings)`` builds an independent app (own metrics
registry, own engine), so tests can run several in one process."""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.bundle import available_models
from service.audio import encode_audio
from service.engine import Engine
from service.logging_setup import setup_logging
from service.metrics import Metrics
from service.runtimes import Runtime, load_runtime
from service.scheduler import Cancelled, EngineError, GenerationJob, JobResult, QueueFull
from service.schemas import ErrorResponse, GenerateRequest, ModelInfo
from service.settings import Settings

log = logging.getLogger("tta.http")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
STATIC_DIR = Path(__file__).resolve().parent / "static"
ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 500: {"model": ErrorResponse},
          503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.field = status, code, message, headers or {}, field


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   field: str | None = None) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    engine: Engine | None = None
    ready: bool = False
    load_error: str | None = None


# ---------------------------------------------------------------------------------------------------- loading
def discover_models(settings: Settings) -> list[Path]:
    """The models to serve: those of ``available_models`` that the settings ask for (all when none are named)."""
    dirs = available_models(settings.model_dir)
    wanted = settings.model_names
    return [p for p in dirs if not wanted or p.name in wanted]


def load_model(path: Path, s: Settings) -> Runtime:
    """A model directory (the zoo's, or a downloaded checkpoint) under the configured runtime."""
    return load_runtime(path, s.runtime, s.device, debug_faults=s.debug_faults, compile=s.torch_compile,
                        precision=s.precision, cuda_graphs=s.cuda_graphs)


def load_models(state: ServiceState) -> None:
    """Runs in a background thread so /health/live answers while weights load; ready after a warm-up generation."""
    s, m = state.settings, state.metrics
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        runtimes: dict[str, Runtime] = {}
        for path in discover_models(s):
            rt = load_model(path, s)
            runtimes[rt.model_name] = rt
            m.model_loaded.labels(rt.model_name, rt.name).set(1)
            log.info("model loaded", extra={"model": rt.model_name, "runtime": rt.name, "path": str(path)})
        if s.default_model not in runtimes:
            raise RuntimeError(f"default model {s.default_model!r} not found in {s.model_dir} "
                               f"(found: {sorted(runtimes) or 'none'})")
        engine = Engine(runtimes, m, policy=s.policy, max_batch=s.max_batch, queue_size=s.queue_size,
                        max_queue_delay_ms=s.max_queue_delay_ms, max_padding=s.max_padding)
        if s.warmup:
            for rt in runtimes.values():
                rt.prepare()
            engine.calibrate()
        engine.start()
        state.runtimes, state.engine = runtimes, engine
        if s.warmup:
            for name, rt in runtimes.items():
                t0 = time.perf_counter()
                engine.generate_sync(dict(id=f"warmup-{name}", model=name, prompt="warm-up",
                                          duration=min(0.5, rt.config.max_duration), steps=1,
                                          guidance=rt.config.default_guidance, seed=0))
                log.info("model warmed up", extra={"model": name, "seconds": round(time.perf_counter() - t0, 3)})
        state.ready = True
        m.ready.set(1)
        log.info("ready", extra={"models": sorted(runtimes), "policy": s.policy, "max_batch": s.max_batch})
    except Exception as exc:  # stays not-ready; /health/ready explains why
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model loading failed")


# ---------------------------------------------------------------------------------------------------- middleware
class BodyLimitMiddleware:
    """413 before parsing: a Content-Length over the limit is refused at once; a chunked body is counted."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
        if too_big:
            return await self._reject(scope, receive, send)
        # Bodies here are small: read the whole body (up to the limit) before the app parses anything.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        if self.on_reject:
            self.on_reject(scope)
        resp = error_response(413, "payload_too_large", f"request body exceeds {self.limit} bytes")
        await resp(scope, receive, send)


# ---------------------------------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)
    metrics.ready.set(0)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        setup_logging(settings.log_level)
        loader = threading.Thread(target=load_models, args=(state,), name="tta-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        yield
        state.ready = False
        metrics.ready.set(0)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="tta: text-to-audio diffusion service", version="0.1.0", lifespan=lifespan,
                  description="POST /generate returns 44.1 kHz stereo PCM16 audio for a text prompt.")
    app.state.tta = state

    def count(model: str, status: int) -> None:
        metrics.requests.labels(model, str(status)).inc()

    def on_body_reject(scope) -> None:
        if scope.get("path") == "/generate":
            count("unknown", 413)

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, on_reject=on_body_reject)

    # ---------------------------------------------------------------- errors: always {"error": {...}}
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if request.url.path == "/generate" and not getattr(request.state, "counted", False):
            count(getattr(request.state, "model", "unknown"), exc.status)
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts, first_field = [], None
        for e in errors:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first_field = first_field or name
            parts.append(f"{name}: {e.get('msg', 'invalid')}")
        if request.url.path == "/generate":
            count("unknown", 422)
        return error_response(422, "invalid_input", "; ".join(parts) or "invalid request", field=first_field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- dependencies
    def require_api_key(request: Request) -> None:
        keys = settings.api_key_set
        if not keys:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given or not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
            raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                           headers={"WWW-Authenticate": "Bearer"})

    def require_ready() -> ServiceState:
        if not state.ready or state.engine is None:
            why = state.load_error or "models are loading"
            raise ApiError(503, "not_ready", f"the service is not ready: {why}", headers={"Retry-After": "5"})
        return state

    # ---------------------------------------------------------------- routes
    # The web playground (service/static/): plain HTML/JS that uses the public API like any other client.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def root():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready():
        if not state.ready:
            return error_response(503, "not_ready", state.load_error or "models are loading or warming up",
                                  headers={"Retry-After": "5"})
        return {"status": "ready", "models": sorted(state.runtimes)}

    @app.get("/metrics", tags=["ops"], include_in_schema=True)
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", tags=["generation"], response_model=list[ModelInfo], responses=ERRORS,
             dependencies=[Depends(require_api_key)])
    async def list_models(st: ServiceState = Depends(require_ready)):
        return [ModelInfo(name=name, kind=rt.config.kind, default_steps=rt.config.default_steps,
                          max_steps=rt.config.max_steps, default_guidance=rt.config.default_guidance,
                          max_duration=rt.config.max_duration, default_duration=rt.config.default_duration,
                          runtime=rt.name, sample_rate=rt.sample_rate, sampler=rt.config.sampler,
                          default=name == settings.default_model) for name, rt in st.runtimes.items()]

    @app.post("/generate", tags=["generation"], responses={200: {"content": {"audio/wav": {}, "audio/flac": {},
                                                                            "audio/ogg": {}}}, **ERRORS},
              response_class=Response, dependencies=[Depends(require_api_key)])
    async def generate(body: GenerateRequest, request: Request, st: ServiceState = Depends(require_ready)):
        arrival = time.monotonic()
        rid = request.headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        name = body.model or settings.default_model
        rt = st.runtimes.get(name)
        if rt is None:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}; GET /models lists "
                           f"{sorted(st.runtimes)}", field="model")
        request.state.model = name
        cfg = rt.config
        duration = cfg.default_duration if body.duration is None else body.duration
        if duration > cfg.max_duration:
            raise ApiError(422, "invalid_input", f"duration: {duration} s exceeds model {name}'s maximum of "
                           f"{cfg.max_duration} s", field="duration")
        steps = cfg.default_steps if body.steps is None else body.steps
        if steps > cfg.max_steps:
            raise ApiError(422, "invalid_input", f"steps: {steps} exceeds model {name}'s maximum of "
                           f"{cfg.max_steps}", field="steps")
        guidance = cfg.default_guidance if body.guidance is None else body.guidance
        seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
        timeout = min(body.timeout or settings.request_timeout, settings.request_timeout)

        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(result: JobResult | None, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        def on_done(result, error):  # any thread
            loop.call_soon_threadsafe(settle, result, error)

        job = GenerationJob(id=rid, model=name, prompt=body.prompt, duration=float(duration), steps=int(steps),
                            guidance=float(guidance), seed=int(seed), deadline=arrival + timeout,
                            on_done=on_done, arrival=arrival)
        status, result, timings = 500, None, {}
        try:
            try:
                st.engine.submit(job)
            except QueueFull as exc:
                status = 429
                raise ApiError(429, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after),
                                                                  "X-Request-Id": rid})
            except EngineError as exc:
                status = exc.status
                raise ApiError(exc.status, exc.code, str(exc), headers={"X-Request-Id": rid})
            watcher = asyncio.create_task(_watch_disconnect(request, job))
            try:
                result = await asyncio.wait_for(fut, timeout=max(0.0, job.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancel("timeout")
                status = 504
                raise ApiError(504, "timeout", f"request {rid} did not finish within its {timeout:g} s deadline",
                               headers={"X-Request-Id": rid})
            except EngineError as exc:
                status = exc.status
                raise ApiError(exc.status, exc.code, str(exc), headers={"X-Request-Id": rid})
            finally:
                watcher.cancel()
            data, media_type = await asyncio.to_thread(encode_audio, result.wave, result.sample_rate, body.format)
            status = 200
            timings = result.timings
        finally:
            elapsed = time.monotonic() - arrival
            if status != 429:
                metrics.request_duration.labels(name).observe(elapsed)
            count(name, status)
            request.state.counted = True
            if status == 200:
                metrics.audio_seconds.labels(name).inc(duration)
            log.info("request", extra={
                "request_id": rid, "model": name, "status": status, "duration_s": duration, "steps": steps,
                "guidance": guidance, "seed": seed, "latency_ms": round(elapsed * 1000, 2),
                **{f"{k}_ms": round(v * 1000, 2) for k, v in timings.items()}})
        server_timing = ", ".join(f"{k};dur={timings[k] * 1000:.2f}" for k in ("queue", "encode", "denoise", "decode"))
        headers = {"X-Request-Id": rid, "X-Seed": str(seed), "X-Model": name, "Server-Timing": server_timing,
                   "X-Steps": str(steps), "X-Guidance": f"{guidance:g}"}
        return Response(content=data, media_type=media_type, headers=headers)

    return app


async def _watch_disconnect(request: Request, job: GenerationJob, every: float = 0.05) -> None:
    """Cancels the job when the client goes away: its sample leaves the batch at the next tick."""
    while not job.resolved:
        if await request.is_disconnected():
            job.cancel("client disconnected")
            job.resolve(None, Cancelled(f"client of request {job.id} disconnected"))
            return
        await asyncio.sleep(every)
