"""The HTTP error contract: every error is JSON ``{"error": {"code": ..., "message": ...}}`` (plus ``field`` for
invalid input), raised as ``ApiError`` anywhere below the routes."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from service.schemas import ErrorResponse



def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the JSON error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


# the error statuses the generation routes document in the OpenAPI schema
ERROR_RESPONSES = error_responses(401, 404, 408, 413, 422, 429, 500, 503, 504)


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
