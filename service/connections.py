"""Connection hygiene under uvicorn: a connection must send a complete request head within ``header_timeout``
seconds of opening (or of its previous response), else it is closed. uvicorn times out idle keep-alive
connections but not a connection that never sends anything, nor one that trickles its headers (slowloris), and
each such socket holds a file descriptor until the process runs out. Request bodies have their own timeout
(``service.middleware.BodyLimitMiddleware``). Beyond ``limit_concurrency`` connections or requests at once (uvicorn's
limit, TTA_MAX_CONNECTIONS) a request is answered 503 by the app itself, in the service's JSON error shape
(``service.middleware.CapacityRefusal``), where uvicorn would answer a plain-text 503."""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import OVER_CAPACITY

log = logging.getLogger("tta.http")

try:  # uvicorn picks httptools when it is installed (uvicorn[standard]), else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - without httptools
    HttpToolsProtocol = None


class HeaderDeadline:
    """Mixed into a uvicorn HTTP protocol class: closes the connection when no request head arrives in time."""

    header_timeout = 10.0  # set per server by ``guarded_protocol``

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request's head is due as well

    def connection_lost(self, exc) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        if not self.transport.is_closing():
            self._header_deadline = asyncio.get_running_loop().call_later(self.header_timeout, self._header_due)

    def _disarm_header_deadline(self) -> None:
        timer = getattr(self, "_header_deadline", None)
        if timer is not None:
            timer.cancel()
            self._header_deadline = None

    def _header_due(self) -> None:
        self._header_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is in progress: its head came in time
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head in time",
                     extra={"client": self.client, "seconds": self.header_timeout})
            self.transport.close()


class CapacityMark:
    """Mixed into a uvicorn HTTP protocol class: uvicorn's ``limit_concurrency`` check, made here instead. uvicorn
    answers a request beyond the limit itself (``text/plain``, "Service Unavailable"); this protocol hands it to the
    app marked ``OVER_CAPACITY`` on its scope, and the app refuses it in its own error shape, before reading its
    body. The limit is uvicorn's: the open connections (this one included) reach it, or the requests in progress
    exceed it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.capacity, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's own check off
        app = self.app

        async def admit(scope, receive, send) -> None:
            # this request's own task is among ``self.tasks`` by now (uvicorn counted the others before adding it)
            if self.capacity is not None and (len(self.connections) >= self.capacity
                                              or len(self.tasks) > self.capacity):
                scope[OVER_CAPACITY] = True
                log.warning("over the connection limit", extra={"limit": self.capacity, "path": scope.get("path")})
            await app(scope, receive, send)

        self.app = admit


def guarded_protocol(header_timeout: float) -> type:
    """The HTTP protocol class uvicorn would pick (httptools, else h11) with ``HeaderDeadline`` and
    ``CapacityMark``."""
    base = HttpToolsProtocol or H11Protocol
    return type(f"Guarded{base.__name__}", (HeaderDeadline, CapacityMark, base),
                {"header_timeout": float(header_timeout)})
