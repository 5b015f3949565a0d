"""The OpenAPI document as the service answers (``GET /openapi.json``), and the methods a path allows.

FastAPI builds the document from the routes; two things in it would not match what the service does:

- it passes every schema through its own OpenAPI model, whose numeric bounds are floats: the seed's maximum,
  2**63 - 1, would come out as 9.223372036854776e18, which is 2**63. Each request body is put back exactly as its
  route declares it (``openapi_extra``; the routes build theirs from the pydantic models);
- a route with parameters gets a default 422 with FastAPI's ``HTTPValidationError`` body, a shape this service never
  answers: every 422 it sends is the JSON error, declared (``service.errors.error_responses``) by the routes that
  send it. The default is dropped, and with it the unused schemas."""
from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute, Match

FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def contract_openapi(app: FastAPI) -> dict:
    """``app``'s OpenAPI document (built once)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for route in app.routes:
            extra = getattr(route, "openapi_extra", None) or {}
            if "requestBody" not in extra or not getattr(route, "include_in_schema", False):
                continue
            for method in route.methods:
                doc["paths"][route.path_format][method.lower()]["requestBody"] = copy.deepcopy(extra["requestBody"])
        for operations in doc["paths"].values():
            for operation in operations.values():
                default = operation.get("responses", {}).get("422", {})
                if default.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref") == FASTAPI_422:
                    del operation["responses"]["422"]
        schemas = doc.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema


def allowed_methods(routes: list[BaseRoute], scope: dict) -> list[str]:
    """The methods the routes serve at the request's path (for ``Allow``), sorted."""
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)
