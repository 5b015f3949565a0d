"""``POST /v1/audio/generate``: vLLM-Omni's text-to-audio request and error shapes over this service's own path.

vLLM-Omni's audio generation route takes ``{"input", "audio_length", "negative_prompt", "guidance_scale",
"num_inference_steps", "seed", "response_format", "model", ...}`` as JSON (unknown fields are ignored), answers
the audio bytes with their media type, and reports errors as OpenAI-style JSON, ``{"error": {"message", "type",
"param", "code"}}`` with ``code`` the HTTP status; invalid input is a 400. This route maps its body onto a
``GenerateRequest`` and from there runs exactly what ``POST /generate`` runs: the same API key and readiness
dependencies, ``resolve_request`` (the model's defaults and limits), ``Gateway.run`` (queue bound, deadline,
cancellation), ``encode_audio``, the same response headers and the same request accounting. Its errors, the body
limit's 413 and the app's handlers' answers included, are rewritten into vLLM-Omni's shape by ``OpenAIErrors``, for
this path only; docs/api.md has the field-by-field table."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Literal

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.datastructures import MutableHeaders

from service.audio import AUDIO_CONTENT
from service.errors import GENERATE_ERRORS, ApiError, error_responses
from service.forms import validate_json
from service.gateway import resolve_request
from service.middleware import RequestAccounting
from service.schemas import GenerateRequest, integral

PATH = "/v1/audio/generate"
# this route's field for each GenerateRequest field it sets
FIELD_NAMES = {"prompt": "input", "duration": "audio_length", "steps": "num_inference_steps",
               "guidance": "guidance_scale", "seed": "seed", "model": "model", "negative_prompt": "negative_prompt",
               "format": "response_format"}


class AudioGenerateRequest(BaseModel):
    """vLLM-Omni's audio generation body. Like vLLM-Omni, fields it does not know are ignored; the types of those
    it knows are strict, as on ``/generate`` (vLLM-Omni's lax parsing would take ``"seed": false`` as seed 0 and
    ``"num_inference_steps": "8"`` as 8)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    input: str = Field(min_length=1, max_length=500, description="what the audio should sound like (this "
                       "service's prompt)")
    model: str | None = Field(None, min_length=1, description="a name from GET /models; the default model when "
                              "absent")
    response_format: Literal["wav", "pcm", "flac", "mp3", "aac", "opus"] = Field(
        "wav", description="aac is answered as wav (audio/wav), as vLLM-Omni does: libsndfile has no AAC encoder; "
        "opus comes at 48 kHz")
    # vLLM-Omni's speed (0.25 .. 4), audio_start and "sse" stream are not offered: the schema admits the one value
    # served, the validators below say why another is refused
    speed: float | None = Field(1.0, ge=1.0, le=1.0, description="only 1: this service does not time-stretch")
    stream_format: Literal["audio"] | None = Field("audio", description="audio (the whole clip in one body)")
    audio_length: float | None = Field(None, ge=0.5, description="seconds (this service's duration), at most the "
                                       "model's max_duration; the model's default when absent")
    audio_start: float | None = Field(0.0, ge=0.0, le=0.0, description="only 0: the clip always starts at the "
                                      "beginning")
    negative_prompt: str | None = Field(None, max_length=500, description="what guidance steers away from")
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, description="classifier-free guidance scale")
    num_inference_steps: int | None = Field(None, ge=1, description="sampler steps, at most the model's max_steps")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random when absent (X-Seed reports it)")

    @field_validator("speed", "audio_start", mode="before")
    @classmethod
    def _the_one_value(cls, value, info: ValidationInfo):
        only, why = {"speed": (1.0, "only 1.0 is supported (the service does not time-stretch its output)"),
                     "audio_start": (0.0, "only 0 is supported (the clip always starts at the beginning)")}[
            info.field_name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != only:
            raise ValueError(why)
        return value

    @field_validator("num_inference_steps", "seed", mode="before")
    @classmethod
    def _integral(cls, value):
        return integral(value)

    @field_validator("stream_format", mode="before")
    @classmethod
    def _no_sse(cls, value):
        if value == "sse":
            raise ValueError("'sse' is not supported: use 'audio'")
        return value

    def generate_request(self) -> GenerateRequest:
        """The same request in this service's terms; ``RequestValidationError`` naming this route's field."""
        fields = {"prompt": self.input, "duration": self.audio_length, "steps": self.num_inference_steps,
                  "guidance": self.guidance_scale, "seed": self.seed, "model": self.model,
                  "negative_prompt": self.negative_prompt or None,  # an empty one is none, as in vLLM-Omni
                  "format": "wav" if self.response_format == "aac" else self.response_format}
        try:
            return GenerateRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except pydantic.ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *map(_compat_name, e["loc"]))}
                                          for e in exc.errors(include_url=False)]) from None


def _compat_name(name) -> str:
    return FIELD_NAMES.get(name, name) if isinstance(name, str) else name


def _renamed(exc: ApiError) -> ApiError:
    """An error of ``resolve_request`` about a field, in this route's field names."""
    name = _compat_name(exc.field)
    if exc.field is None or name == exc.field:
        return exc
    message = exc.message.replace(f"{exc.field}:", f"{name}:", 1)
    return ApiError(exc.status, exc.code, message, exc.headers, name)


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str = Field(description="BadRequestError, NotFoundError, InternalServerError, else the status's phrase")
    param: str | None = Field(None, description="the request field at fault, where one is")
    code: int = Field(description="the HTTP status")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorInfo


def error_type(status: int) -> str:
    """vLLM's names: its own errors' (bad request, not found, internal), else the status's phrase, as vLLM's HTTP
    exception handler gives."""
    names = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
    return names.get(status) or HTTPStatus(status).phrase


def openai_error(status: int, body: dict) -> tuple[int, dict]:
    """A service error (status, ``{"error": {"code", "message", "field"}}``) as vLLM-Omni answers it: invalid input
    is a 400 there (pydantic's and its own checks alike)."""
    status = 400 if status == 422 else status
    error = body["error"]
    return status, {"error": {"message": error["message"], "type": error_type(status), "param": error.get("field"),
                              "code": status}}


class OpenAIErrors:
    """For requests to ``path``: every JSON error answer (the route's, the app's handlers', the body limit's) in
    vLLM-Omni's shape; headers (Retry-After, WWW-Authenticate, X-Request-Id) stay."""

    def __init__(self, app, path: str):
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if message["status"] >= 400 and headers.get("content-type", "").startswith("application/json"):
                    start = message  # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await self._send_rewritten(send, start, b"".join(chunks))
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    @staticmethod
    async def _send_rewritten(send, start: dict, body: bytes) -> None:
        status = start["status"]
        try:
            status, converted = openai_error(status, json.loads(body))
            body = json.dumps(converted).encode()
        except (ValueError, KeyError, TypeError):  # not the service's error shape: as it was
            pass
        headers = MutableHeaders(scope=start)
        headers["content-length"] = str(len(body))
        await send({**start, "status": status})
        await send({"type": "http.response.body", "body": body})


# /generate's error statuses, invalid input a 400 as in vLLM
ERRORS = tuple(sorted({400, *GENERATE_ERRORS} - {422}))


def install_compat_routes(app: FastAPI, state, require_api_key: Callable, require_ready: Callable) -> None:
    """Adds the route to ``app`` (``state``: the app's ``ServiceState``), with its error rewriting and its request
    accounting (the last middleware added runs first: accounting records the status the client gets)."""
    settings = state.settings
    app.add_middleware(OpenAIErrors, path=PATH)
    app.add_middleware(RequestAccounting, metrics=state.metrics, paths=(PATH,))

    @app.post(PATH, tags=["compatibility"], response_class=Response, dependencies=[Depends(require_api_key)],
              responses={200: {"content": AUDIO_CONTENT},
                         **error_responses(*ERRORS, model=OpenAIErrorResponse)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": AudioGenerateRequest.model_json_schema()}}}})
    async def audio_generate(request: Request, st=Depends(require_ready)):
        """vLLM-Omni's ``/v1/audio/generate``: the audio bytes, with the headers of ``POST /generate``."""
        compat = validate_json(await request.body(), AudioGenerateRequest)  # strict types, as on /generate
        body = compat.generate_request()
        try:
            spec = await asyncio.to_thread(resolve_request, body, st.engine.pipelines, settings.default_model)
        except ApiError as exc:
            raise _renamed(exc) from None
        return await st.gateway.respond(request, spec, body.format, None, route=PATH)
