"""A Python client of the service's HTTP API (``httpx``; no torch, nothing else of the service):

    from service.client import Client

    with Client("http://localhost:8000", api_key=None) as tta:
        clip = tta.generate("rain on a tin roof", duration=5, seed=1)          # a synchronous POST /generate
        open("rain.wav", "wb").write(clip.audio)
        job = tta.submit("thunder far away", duration=30, format="flac")       # POST /jobs
        clip = tta.wait(job, on_progress=lambda e: print(e.name, e.data))    # its events, then its result

Every error answer becomes an exception of its code's type (``QueueFull`` for 429, ``InvalidInput`` for 422, ...),
all ``ApiError``s carrying the HTTP status, the error code, the message, the field and ``Retry-After``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx


# ---------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answer: ``status`` (HTTP), ``code`` and ``message`` from the JSON error body, the ``field`` it is
    about (invalid input), ``retry_after`` seconds when the server said when to come back."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


class Unauthorized(ApiError): ...            # 401
class NotFound(ApiError): ...                # 404: unknown model, job or route
class RequestTimeout(ApiError): ...          # 408: the request body stalled
class JobNotReady(ApiError): ...             # 409: the job is unfinished, failed or was cancelled
class Expired(ApiError): ...                 # 410: the job's result has expired
class PayloadTooLarge(ApiError): ...         # 413
class InvalidInput(ApiError): ...            # 422
class QueueFull(ApiError): ...               # 429
class ClientClosedRequest(ApiError): ...     # 499
class ServerError(ApiError): ...             # 500
class NotReady(ApiError): ...                # 503: loading, draining, or too many connections
class GenerationTimeout(ApiError): ...       # 504: the generation missed its deadline


ERRORS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 408: RequestTimeout, 409: JobNotReady,
                                     410: Expired, 413: PayloadTooLarge, 422: InvalidInput, 429: QueueFull,
                                     499: ClientClosedRequest, 500: ServerError, 503: NotReady,
                                     504: GenerationTimeout}


def error_from(status: int, body: dict | None, headers: dict | None = None) -> ApiError:
    """The typed exception of an error answer (or of a job's ``error``)."""
    error = (body or {}).get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    retry = (headers or {}).get("retry-after")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    cls = ERRORS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, str(error.get("code", "http_error")), str(error.get("message", f"HTTP {status}")),
               error.get("field"), retry_after)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Clip:
    """Generated audio: the encoded file and what the server said about it."""

    audio: bytes
    media_type: str
    seed: int | None
    model: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Event:
    """One job event: ``queued`` (position), ``running``, ``step`` (step, steps), ``decoding``, ``done``,
    ``failed``, ``cancelled``."""

    id: int
    name: str
    data: dict


def _clip(r: httpx.Response) -> Clip:
    seed = r.headers.get("x-seed")
    return Clip(r.content, r.headers.get("content-type", ""), int(seed) if seed else None, r.headers.get("x-model"),
                dict(r.headers))


# ---------------------------------------------------------------------------------------------------- client
def _check(r: httpx.Response) -> httpx.Response:
    if r.is_success:
        return r
    try:
        body = r.json()
    except ValueError:
        body = None
    raise error_from(r.status_code, body, dict(r.headers))


def _id(job: dict | str) -> str:
    return job["id"] if isinstance(job, dict) else job


class _Calls:
    """What each API call sends (method, path, httpx arguments); ``Client`` and ``AsyncClient`` send it."""

    @staticmethod
    def _post(path: str, prompt: str, fields: dict, init_audio: bytes | None,
              request_id: str | None = None) -> tuple[str, str, dict]:
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        kw: dict = {"headers": {"X-Request-Id": request_id}} if request_id else {}
        if init_audio is None:
            kw["json"] = body
        else:  # a multipart form: the clip as a file
            kw.update(data={k: str(v) for k, v in body.items()}, files={"init_audio": ("init", init_audio)})
        return "POST", path, kw

    @staticmethod
    def _events_request(job: dict | str, after: int | None) -> tuple[str, dict]:
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        return f"/jobs/{_id(job)}/events", headers


class _EventParser:
    """Server-Sent Events, line by line: ``feed`` returns an ``Event`` at each blank line that ends one."""

    def __init__(self):
        self.name, self.data, self.id = None, [], None

    def feed(self, line: str) -> Event | None:
        if line.startswith(":"):
            return None  # a keep-alive comment
        if line == "":
            event = None
            if self.name is not None:
                event = Event(int(self.id) if self.id else -1, self.name, json.loads("\n".join(self.data) or "{}"))
            self.name, self.data, self.id = None, [], None
            return event
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            self.name = value
        elif key == "data":
            self.data.append(value)
        elif key == "id":
            self.id = value
        return None


def _job_error(info: dict) -> ApiError:
    error = info.get("error") or {}
    return error_from(int(error.get("status", 500)), {"error": error})


class Client(_Calls):
    """Synchronous (``httpx.Client``)."""

    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 120.0,
                 http: httpx.Client | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self) -> list[dict]:
        return _check(self.http.get("/models")).json()

    def generate(self, prompt: str, *, init_audio: bytes | None = None, request_id: str | None = None,
                 **fields) -> Clip:
        """``POST /generate``: fields as the API names them (duration, steps, guidance, seed, model, format,
        timeout, negative_prompt, init_noise_level, inpaint_start, inpaint_end); ``init_audio``: a clip's file
        bytes (sent as a multipart form)."""
        method, path, kw = self._post("/generate", prompt, fields, init_audio, request_id)
        return _clip(_check(self.http.request(method, path, **kw)))

    def submit(self, prompt: str, *, init_audio: bytes | None = None, webhook: str | None = None,
               **fields) -> dict:
        """``POST /jobs``: the job's status (``id``, ``status``, ``links``, ...)."""
        method, path, kw = self._post("/jobs", prompt, {**fields, "webhook": webhook}, init_audio)
        return _check(self.http.request(method, path, **kw)).json()

    def status(self, job: dict | str) -> dict:
        return _check(self.http.get(f"/jobs/{_id(job)}")).json()

    def cancel(self, job: dict | str) -> dict:
        return _check(self.http.delete(f"/jobs/{_id(job)}")).json()

    def result(self, job: dict | str) -> Clip:
        return _clip(_check(self.http.get(f"/jobs/{_id(job)}/result")))

    def events(self, job: dict | str, after: int | None = None, timeout: float | None = None) -> Iterator[Event]:
        """The job's events as they come (Server-Sent Events), from the first (or after id ``after``), until its
        final one; ``timeout``: the longest wait for the next line (None: no limit)."""
        path, headers = self._events_request(job, after)
        with self.http.stream("GET", path, headers=headers,
                              timeout=httpx.Timeout(self.http.timeout.connect, read=timeout)) as r:
            if not r.is_success:
                r.read()
                _check(r)
            parser = _EventParser()
            for line in r.iter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    def wait(self, job: dict | str, on_progress: Callable[[Event], None] | None = None,
             timeout: float | None = None) -> Clip:
        """Follow the job to its end (``on_progress`` hears every event) and return its audio; a job that failed or
        was cancelled raises the error ``/generate`` would have raised (its ``error``)."""
        last = None
        for last in self.events(job, timeout=timeout):
            if on_progress is not None:
                on_progress(last)
        if last is None or last.name != "done":
            raise _job_error(self.status(job))
        return self.result(job)


class AsyncClient(_Calls):
    """The same calls for asyncio (``httpx.AsyncClient``): ``await c.generate(...)``, ``async for e in
    c.events(job)``."""

    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 120.0,
                 http: httpx.AsyncClient | None = None, **httpx_options):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers,
                                              **httpx_options)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def models(self) -> list[dict]:
        return _check(await self.http.get("/models")).json()

    async def generate(self, prompt: str, *, init_audio: bytes | None = None, request_id: str | None = None,
                       **fields) -> Clip:
        method, path, kw = self._post("/generate", prompt, fields, init_audio, request_id)
        return _clip(_check(await self.http.request(method, path, **kw)))

    async def submit(self, prompt: str, *, init_audio: bytes | None = None, webhook: str | None = None,
                     **fields) -> dict:
        method, path, kw = self._post("/jobs", prompt, {**fields, "webhook": webhook}, init_audio)
        return _check(await self.http.request(method, path, **kw)).json()

    async def status(self, job: dict | str) -> dict:
        return _check(await self.http.get(f"/jobs/{_id(job)}")).json()

    async def cancel(self, job: dict | str) -> dict:
        return _check(await self.http.delete(f"/jobs/{_id(job)}")).json()

    async def result(self, job: dict | str) -> Clip:
        return _clip(_check(await self.http.get(f"/jobs/{_id(job)}/result")))

    async def events(self, job: dict | str, after: int | None = None, timeout: float | None = None):
        path, headers = self._events_request(job, after)
        async with self.http.stream("GET", path, headers=headers,
                                    timeout=httpx.Timeout(self.http.timeout.connect, read=timeout)) as r:
            if not r.is_success:
                await r.aread()
                _check(r)
            parser = _EventParser()
            async for line in r.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    async def wait(self, job: dict | str, on_progress: Callable[[Event], None] | None = None,
                   timeout: float | None = None) -> Clip:
        last = None
        async for last in self.events(job, timeout=timeout):
            if on_progress is not None:
                on_progress(last)
        if last is None or last.name != "done":
            raise _job_error(await self.status(job))
        return await self.result(job)
