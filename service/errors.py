"""The HTTP error contract: every error is JSON ``{"error": {"code": ..., "message": ...}}`` (plus ``field`` for
invalid input), raised as ``ApiError`` anywhere below the routes; ``error_responses`` declares a route's error
statuses in the OpenAPI schema."""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.schemas import ErrorResponse

# What each error status means wherever a route answers it (docs/api.md lists the codes). Beyond
# TTA_MAX_CONNECTIONS requests at once any route answers 503, so every route declares it.
ERROR_DESCRIPTIONS = {
    400: "invalid input: a malformed body, a missing, unknown or out-of-range field, or one over the model's "
         "limits (`param` names the field)",
    401: "unauthorized: API keys are configured (TTA_API_KEYS) and the request carries none of them",
    404: "unknown_model: the model named is not served (GET /models lists them)",
    408: "request_timeout: the request body stalled for TTA_BODY_TIMEOUT seconds",
    409: "job_not_finished (Retry-After), job_failed or job_cancelled: the job has no result",
    410: "job_expired: the job's result has expired or was discarded",
    413: "payload_too_large: the body exceeds TTA_MAX_BODY_BYTES (TTA_MAX_UPLOAD_BYTES with an audio clip)",
    422: "invalid_input: a malformed body (not JSON, not UTF-8, nested too deep, a number out of range), a "
         "missing, unknown, mistyped or out-of-range field, or one over the model's limits (`field` names it)",
    429: "queue_full or deadline_unreachable (Retry-After): the queue is full, or the request cannot finish "
         "before its deadline",
    500: "internal_error: a fault in the batch this request was in (the log has the details under its request id)",
    503: "not_ready (models loading, loading failed, or shutting down; Retry-After), or over_capacity "
         "(TTA_MAX_CONNECTIONS requests are being served at once; Retry-After)",
    504: "timeout: the request's deadline passed before its audio was ready",
}
# the error statuses of a synchronous generation (POST /generate; 400 for 422 on POST /v1/audio/generate)
GENERATE_ERRORS = (401, 404, 408, 413, 422, 429, 500, 503, 504)
# the 503 of a route that does not wait for readiness
OVER_CAPACITY = "over_capacity: TTA_MAX_CONNECTIONS requests are being served at once (Retry-After)"
UNKNOWN_JOB = "unknown_job: no such job, another key's job, or one forgotten after twice TTA_JOB_TTL"


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse,
                    descriptions: dict[int, str] | None = None) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the JSON error body (``model``) and what it
    means (``descriptions``: a route's own words for some of them)."""
    return {status: {"model": model, "description": (descriptions or {}).get(status, ERROR_DESCRIPTIONS[status])}
            for status in statuses}


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
