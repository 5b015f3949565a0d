"""The FastAPI app: thin routes over the engine. ``create_app(settings)`` builds an independent app (own metrics
registry, own engine), so tests can run several in one process.

A route validates (pydantic), resolves the request against its model (``service.gateway``), awaits the engine
through the gateway, encodes the audio and answers; counting, timing and logging happen once, in
``service.middleware.RequestAccounting``."""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from models.registry import available_models
from service.audio import AUDIO_CONTENT
from service.compat import install_compat_routes
from service.engine import Engine
from service.errors import GENERATE_ERRORS, OVER_CAPACITY, ApiError, error_response, error_responses
from service.forms import read_generate_request, request_body_openapi
from service.gateway import Gateway, resolve_request
from service.job_routes import install_job_routes
from service import malloc
from service.logging_setup import setup_logging
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, CapacityRefusal, RequestAccounting, SecurityHeaders
from service.openapi import allowed_methods, contract_openapi
from service.runtimes import Runtime, load_runtime
from service.schemas import ModelInfo
from service.settings import Settings

log = logging.getLogger("tta.http")
STATIC_DIR = Path(__file__).resolve().parent / "static"
# /health/ready's 503 message while the models load and warm up, and while draining; any other message is why
# loading failed (the server then stays up, not ready, for an operator to read it)
LOADING, SHUTTING_DOWN = "models are loading or warming up", "shutting down"


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    engine: Engine | None = None
    gateway: Gateway | None = None
    ready: bool = False
    load_error: str | None = None
    failed: dict[str, str] = field(default_factory=dict)  # model directory name -> why it did not load
    draining: bool = False


def begin_drain(state: ServiceState) -> None:
    """Shutdown has begun: new work gets 503 at once (and readiness fails, so balancers stop sending), work in
    flight may finish for ``drain_timeout`` seconds, then the engine stops and what is left gets a clean 503."""
    if state.draining:
        return
    state.draining, state.ready = True, False
    state.metrics.ready.set(0)
    log.info("draining", extra={"seconds": state.settings.drain_timeout})
    engine = state.engine

    def stop_when_due() -> None:
        deadline = time.monotonic() + state.settings.drain_timeout
        while time.monotonic() < deadline and engine is not None and engine.busy():
            time.sleep(0.05)
        if engine is not None:
            engine.stop()

    threading.Thread(target=stop_when_due, name="tta-drain", daemon=True).start()


# ---------------------------------------------------------------------------------------------------- loading
def discover_models(settings: Settings) -> list[Path]:
    """The models to serve: those of ``available_models`` that the settings ask for (all when none are named)."""
    dirs = available_models(settings.model_dir)
    wanted = settings.model_names
    return [p for p in dirs if not wanted or p.name in wanted]


def load_model(path: Path, s: Settings) -> Runtime:
    """A model directory (the zoo's, or a downloaded checkpoint) under the configured runtime."""
    return load_runtime(path, s.runtime, s.device, debug_faults=s.debug_faults, compile=s.torch_compile,
                        precision=s.precision, cuda_graphs=s.cuda_graphs, decode_precision=s.decode_precision,
                        compile_blocks=s.compile_blocks)


def load_models(state: ServiceState) -> None:
    """Runs in a background thread so /health/live answers while weights load; ready after a warm-up generation.
    A model that fails to load is reported (``ServiceState.failed``, ``GET /models``, ``tta_model_loaded`` 0, an
    error log line naming it) and the others serve; the service is ready when the default model and every model the
    settings name are up."""
    s, m = state.settings, state.metrics
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        runtimes: dict[str, Runtime] = {}
        for path in discover_models(s):
            try:
                rt = load_model(path, s)
            except Exception as exc:  # noqa: BLE001 - one bad model directory must not take the others down
                state.failed[path.name] = f"{type(exc).__name__}: {exc}"
                m.model_loaded.labels(path.name, s.runtime).set(0)
                log.error("model failed to load", exc_info=(type(exc), exc, exc.__traceback__),
                          extra={"model": path.name, "path": str(path)})
                continue
            runtimes[rt.model_name] = rt
            m.model_loaded.labels(rt.model_name, rt.name).set(1)
            log.info("model loaded", extra={"model": rt.model_name, "runtime": rt.name, "path": str(path)})
        missing = [name for name in [s.default_model, *s.model_names] if name not in runtimes]
        if missing:
            failed = [n for n in missing if n in state.failed]
            raise RuntimeError("required model(s) " + ", ".join(repr(n) for n in missing) + " not available: "
                               + (f"{', '.join(failed)} failed to load (GET /models and the log say why)" if failed
                                  else f"not found in {s.model_dir} (found: {sorted(runtimes) or 'none'})"))
        engine = Engine(runtimes, m, policy=s.policy, max_batch=s.max_batch, queue_size=s.queue_size,
                        max_queue_delay_ms=s.max_queue_delay_ms, max_padding=s.max_padding,
                        whole_generation=s.whole_generation, tick_graphs=s.tick_graphs)
        if s.warmup:
            for rt in runtimes.values():
                rt.prepare()
            engine.calibrate()
        engine.start()
        state.runtimes, state.engine = runtimes, engine
        state.gateway = Gateway(engine, s.request_timeout, s.mp3_bitrate_kbps)
        if s.warmup:
            for name, rt in runtimes.items():
                t0 = time.perf_counter()
                engine.generate_sync(dict(id=f"warmup-{name}", model=name, prompt="warm-up",
                                          duration=min(0.5, rt.config.max_duration), steps=1,
                                          guidance=rt.config.default_guidance, seed=0))
                log.info("model warmed up", extra={"model": name, "seconds": round(time.perf_counter() - t0, 3)})
        state.ready = True
        m.ready.set(1)
        log.info("ready", extra={"models": sorted(runtimes), "failed": sorted(state.failed), "policy": s.policy,
                                 "max_batch": s.max_batch})
    except Exception as exc:  # stays not-ready; /health/ready explains why
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model loading failed")


# ---------------------------------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)
    metrics.ready.set(0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        setup_logging(settings.log_level, settings.replica_name)
        if settings.malloc_tuning:
            malloc.tune()  # before the models load, so that their buffers are allocated under it
        loader = threading.Thread(target=load_models, args=(state,), name="tta-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        yield
        state.ready = False
        metrics.ready.set(0)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="tta: text-to-audio diffusion service", version="0.1.0", lifespan=lifespan,
                  description="POST /generate returns 44.1 kHz stereo PCM16 audio for a text prompt.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # a redirect would be built from the request's Host header
    app.state.tta = state
    # the last added runs first: accounting sees every answer, the body limit's 413 and the connection limit's 503
    # included
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes,
                       body_timeout=settings.body_timeout)
    app.add_middleware(CapacityRefusal, limit=settings.max_connections)
    app.add_middleware(RequestAccounting, metrics=metrics, paths=("/generate", "/jobs"))
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Request-Id",
                                          "Last-Event-ID"],
                           expose_headers=["X-Request-Id", "X-Seed", "X-Model", "X-Steps", "X-Guidance",
                                           "Server-Timing", "Retry-After", "Location"], max_age=600)
    app.add_middleware(SecurityHeaders, replica=settings.replica_name)

    # ---------------------------------------------------------------- errors: always {"error": {...}}
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts, first_field = [], None
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first_field = first_field or name
            parts.append(f"{name}: {e.get('msg', 'invalid')}")
        return error_response(422, "invalid_input", "; ".join(parts) or "invalid request", field=first_field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path (the router names only its first route's)
            headers["Allow"] = ", ".join(allowed_methods(app.router.routes, request.scope))
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", None)
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__),
                  extra={"path": request.url.path, "request_id": rid})
        return error_response(500, "internal_error", "internal server error; the server log has the details"
                              + (f" (request {rid})" if rid else ""))

    # ---------------------------------------------------------------- dependencies
    def require_api_key(request: Request) -> str | None:
        """The key the request carries (None with authentication off); 401 without a valid one."""
        keys = settings.api_key_set
        if not keys:
            return None
        auth = request.headers.get("authorization", "")
        given = [request.headers.get("x-api-key") or "", auth[7:].strip() if auth[:7].lower() == "bearer " else ""]
        # either header may carry it; each candidate is compared with every key in constant time
        for g in given:
            if g and any(secrets.compare_digest(g.encode(), k.encode()) for k in keys):
                return g
        raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                       headers={"WWW-Authenticate": "Bearer"})

    def require_ready() -> ServiceState:
        if not state.ready or state.gateway is None:
            why = "it is shutting down" if state.draining else state.load_error or "models are loading"
            raise ApiError(503, "not_ready", f"the service is not ready: {why}", headers={"Retry-After": "5"})
        return state

    # ---------------------------------------------------------------- routes
    # The web playground (service/static/): plain HTML/JS that uses the public API like any other client.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def root():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health/live", tags=["health"], responses=error_responses(503, descriptions={
        503: "engine_stalled: the engine's worker has stopped or stalled (restart the process); or over_capacity"}))
    async def live():
        """200 while the process serves and its engine's worker is alive and coming round its loop; 503 when the
        worker has died or stalled for ``TTA_ENGINE_STALL_SECONDS`` (an orchestrator should restart it)."""
        engine = state.engine
        if engine is not None and not state.draining and not engine.alive(settings.engine_stall_seconds):
            return error_response(503, "engine_stalled", "the engine's worker has stopped or stalled")
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses=error_responses(503))
    async def ready():
        if not state.ready:
            why = SHUTTING_DOWN if state.draining else state.load_error or LOADING
            return error_response(503, "not_ready", why, headers={"Retry-After": "5"})
        return {"status": "ready", "models": sorted(state.runtimes)}

    ops = [Depends(require_api_key)] if settings.protect_ops else []

    @app.get("/metrics", tags=["ops"], dependencies=ops, response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                        **error_responses(401, 503, descriptions={
                            401: "unauthorized: with TTA_PROTECT_OPS and API keys, a request without one",
                            503: OVER_CAPACITY})})
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: contract_openapi(app)  # FastAPI's, exact (service/openapi.py)

    @app.get("/openapi.json", include_in_schema=False, dependencies=ops)
    async def openapi():
        return app.openapi()

    # the OpenAPI page's assets come from this service (swagger-ui-bundle), not a CDN: it works offline
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=ops)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title + " - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="data:,")

    @app.get("/models", tags=["generation"], response_model=list[ModelInfo], responses=error_responses(401, 503),
             dependencies=[Depends(require_api_key)])
    async def list_models(st: ServiceState = Depends(require_ready)):
        served = [ModelInfo(name=name, kind=rt.config.kind, default_steps=rt.config.default_steps,
                            max_steps=rt.config.max_steps, default_guidance=rt.config.default_guidance,
                            max_duration=rt.config.max_duration, default_duration=rt.config.default_duration,
                            runtime=rt.name, sample_rate=rt.sample_rate, sampler=rt.config.sampler,
                            default=name == settings.default_model, modes=st.engine.runners[name].pipeline.modes)
                  for name, rt in st.runtimes.items()]
        return served + [ModelInfo(name=name, status="failed", error=why) for name, why in st.failed.items()]

    @app.post("/generate", tags=["generation"], responses={200: {"content": AUDIO_CONTENT},
                                                           **error_responses(*GENERATE_ERRORS)},
              response_class=Response, dependencies=[Depends(require_api_key)],
              openapi_extra={"requestBody": request_body_openapi()})
    async def generate(request: Request, st: ServiceState = Depends(require_ready)):
        """Text-to-audio, audio-to-audio (``init_audio`` + ``init_noise_level``), inpainting and outpainting
        (``init_audio`` + ``inpaint_start`` / ``inpaint_end``), negative prompts: JSON, or the same fields as a
        multipart form with ``init_audio`` as a file."""
        body, clip = await read_generate_request(request, settings.max_upload_bytes)
        spec = await asyncio.to_thread(resolve_request, body, st.engine.pipelines, settings.default_model, clip)
        return await st.gateway.respond(request, spec, body.format, body.timeout)

    app.state.jobs = install_job_routes(app, state, require_api_key, require_ready)
    install_compat_routes(app, state, require_api_key, require_ready)  # vLLM-Omni's POST /v1/audio/generate
    return app
