"""ASGI middleware of the generation routes: the body limit before parsing, the answer to a request beyond the
connection limit, and one place where every generation request is counted, timed and logged, whatever answered it
(the route, validation, the body limit, the connection limit, auth, readiness)."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders

from service.errors import error_response
from service.metrics import Metrics

log = logging.getLogger("tta.http")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestAccounting:
    """For ``POST`` to ``paths``: gives the request an id (the client's ``X-Request-Id`` when well formed, else a
    new one) in ``request.state.request_id`` and on every response; afterwards records ``tta_requests_total``,
    ``tta_request_duration_seconds`` (requests the engine took, any status but 429), the audio seconds of a 200 and
    one log line. The routes leave what they know in ``request.state``: ``model``, ``submitted``,
    ``audio_seconds`` and ``log`` (extra fields for the log line)."""

    def __init__(self, app, metrics: Metrics, paths: tuple[str, ...] = ("/generate",)):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        arrival = time.monotonic()
        state = scope.setdefault("state", {})
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state.update(request_id=rid, arrival=arrival)
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-Id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # cancelled by what serves us (its client left): nginx's 499
            status = status or 499
            raise
        except BaseException:
            status = status or 500  # the server's error handler answers it
            raise
        finally:
            # no answer at all: the client went away before one was due (nginx's 499)
            self.record(state, status or 499, time.monotonic() - arrival)

    def record(self, state: dict, status: int, elapsed: float) -> None:
        m, model = self.metrics, state.get("model", "unknown")
        m.requests.labels(model, str(status)).inc()
        if state.get("submitted") and status != 429:
            m.request_duration.labels(model).observe(elapsed)
        if status == 200:
            m.audio_seconds.labels(model).inc(state.get("audio_seconds", 0.0))
        log.info("request", extra={"request_id": state["request_id"], "model": model, "status": status,
                                   "latency_ms": round(elapsed * 1000, 2), **state.get("log", {})})


class BodyLimitMiddleware:
    """413 before parsing. A request body may hold ``limit`` bytes, or ``upload_limit`` when it carries an audio clip
    (a multipart form, or JSON with an ``init_audio`` field); a Content-Length over the larger limit is refused at
    once, a body without one is counted as it arrives. A body that stalls for ``body_timeout`` seconds gets 408."""

    def __init__(self, app, limit: int, upload_limit: int | None = None, body_timeout: float | None = None):
        self.app, self.limit, self.body_timeout = app, limit, body_timeout
        self.upload_limit = max(limit, upload_limit or limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        ceiling = self.upload_limit
        length = headers.get(b"content-length")
        try:
            too_big = length is not None and int(length) > ceiling
        except ValueError:
            too_big = False
        if too_big:
            return await self._reject(scope, receive, send, ceiling)
        # Bodies are read whole (up to the ceiling) before the app parses anything.
        chunks, received = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                resp = error_response(408, "request_timeout", f"the request body stalled for {self.body_timeout:g} s")
                return await resp(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > ceiling:
                return await self._reject(scope, receive, send, ceiling)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if received > self.limit and not multipart and b'"init_audio"' not in body:
            return await self._reject(scope, receive, send, self.limit)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, limit: int):
        what = "with an audio clip " if limit > self.limit else ""
        resp = error_response(413, "payload_too_large", f"request body {what}exceeds {limit} bytes")
        await resp(scope, receive, send)


# set on a request's ASGI scope by the server's protocol (``service.connections``) when it arrives beyond the
# connection limit
OVER_CAPACITY = "tta.over_capacity"


class CapacityRefusal:
    """Answers a request that arrived beyond the server's connection limit (``OVER_CAPACITY`` on its scope, set by
    ``service.connections.guarded_protocol``): 503 ``over_capacity`` in the service's JSON (inside the app, so the
    accounting, the security headers and a route's own error shape apply), before its body is read; the connection
    is closed after it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get(OVER_CAPACITY):
            return await self.app(scope, receive, send)
        resp = error_response(503, "over_capacity", f"the server is serving its maximum of {self.limit} connections "
                              "and requests at once; retry shortly",
                              headers={"Retry-After": "1", "Connection": "close"})
        await resp(scope, receive, send)


class SecurityHeaders:
    """Headers every response carries: no MIME sniffing, no framing, no referrer, and a content security policy that
    lets pages load only this service's own scripts, styles and media (the OpenAPI page's one inline script
    included); ``X-Replica`` when the process is one of several replicas."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer"),
               (b"content-security-policy", b"default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                            b"style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                                            b"media-src 'self' blob:; connect-src 'self' blob:; frame-ancestors 'none'")]

    def __init__(self, app, replica: str = ""):
        self.app = app
        self.headers = self.HEADERS + ([(b"x-replica", replica.encode("latin-1"))] if replica else [])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] = list(message["headers"]) + [h for h in self.headers if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)
