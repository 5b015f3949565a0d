"""Middleware for Ray Serve's HTTP proxy, so that the answers the proxy makes itself keep the service's contract.

Ray's proxy answers a few requests without the service: when the replica holding a request dies (no answer at all:
the client would get a bare 500), when its router's queue is full (``max_queued_requests``: plain text), when no
replica is running (plain text 503). Every error the service makes is JSON, so a plain-text error here is the
proxy's own and is replaced by the service's shape, ``{"error": {"code", "message"}}``, keeping its status and
``Retry-After``; a request whose replica died gets a 503 with ``Retry-After: 1`` (the deployment is already
replacing the replica, and any other replica can take the retry). The proxy also appends its own ``X-Request-ID``
to every response, which doubles the service's ``X-Request-Id`` (the same value: the service adopts the id the
proxy puts on the request); the copy is dropped.

When a client goes away, Ray's proxy would cancel the replica's request task, which the service takes for a 500
and which leaves the job running in the engine to its last step. Each request is therefore marked
``x-request-disconnect-disabled: ?1`` (Ray's per-request switch): the proxy forwards the disconnect instead, and the
service ends the job at the next tick and counts a 499, as it does without Ray.

Installed with ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.ray.proxy:middlewares`` in the environment of
``ray start`` (the proxy actors inherit it; the repository root must be on ``PYTHONPATH``).
"""
from __future__ import annotations

from starlette.middleware import Middleware

from service.errors import error_response

# status -> (status answered, code) for the proxy's own plain-text answers; the codes are the service's
REPLACED = {429: (429, "queue_full"), 503: (503, "not_ready"), 408: (504, "timeout"), 500: (503, "replica_lost"),
            404: (404, "not_found")}
DISCONNECT_FORWARDED = (b"x-request-disconnect-disabled", b"?1")
LOST = "the replica serving this request stopped before answering; retry (the deployment is replacing it)"


def _header(headers, name: bytes) -> bytes | None:
    return next((v for k, v in headers if k.lower() == name), None)


class JsonProxyErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = {**scope, "headers": [*(scope.get("headers") or []), DISCONNECT_FORWARDED]}
        started, replacing = False, None

        async def guarded_send(message):
            nonlocal started, replacing
            if message["type"] == "http.response.start":
                started = True
                headers = _dedupe_request_id(message.get("headers") or [])
                message = {**message, "headers": headers}
                media = _header(headers, b"content-type") or b""
                if message["status"] >= 400 and not media.startswith(b"application/json"):
                    replacing = message  # the proxy's own answer: its body follows
                    return
            elif replacing is not None and message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await self._answer(scope, receive, send, replacing["status"], replacing["headers"],
                                       message.get("body", b"").decode("utf-8", "replace").strip())
                return
            await send(message)

        await self.app(scope, receive, guarded_send)
        if not started:  # the replica died with the request (or the client left: nobody reads this then)
            await self._answer(scope, receive, send, 500, [], LOST)

    async def _answer(self, scope, receive, send, status: int, headers, message: str) -> None:
        status, code = REPLACED.get(status, (status, "proxy_error"))
        extra = {"Retry-After": (_header(headers, b"retry-after") or b"1").decode("latin-1")} \
            if status in (429, 503) else {}
        rid = _header(headers, b"x-request-id") or _header(scope.get("headers") or [], b"x-request-id")
        if rid:
            extra["X-Request-Id"] = rid.decode("latin-1")
        await error_response(status, code, message or LOST, headers=extra)(scope, receive, send)


def _dedupe_request_id(headers) -> list:
    seen, out = set(), []
    for name, value in headers:
        if name.lower() == b"x-request-id":
            if value in seen:
                continue
            seen.add(value)
        out.append((name, value))
    return out


def middlewares() -> list[Middleware]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` points at: the proxy wraps its app in these."""
    return [Middleware(JsonProxyErrors)]
