"""Job webhooks: which URLs a job may ask to be called (only hosts the operator allows: a webhook is a request the
server makes on a client's behalf, so an open one would let any client reach the server's own network), and the
one call made when a job ends, signed with HMAC-SHA256 when a secret is set.

Signature (``X-TTA-Signature: t=<unix seconds>,v1=<hex>``): HMAC-SHA256 with the secret as key over
``"<t>." + body``; a receiver recomputes it, compares in constant time and rejects old timestamps (``verify``)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from urllib.parse import urlsplit

import httpx

from service.errors import ApiError

log = logging.getLogger("tta.http")
SIGNATURE_HEADER = "X-TTA-Signature"


def check_webhook(url: str, allowed_hosts: list[str]) -> str:
    """The URL, when a job may call it: http(s), no credentials in it, its host (or host:port) among
    ``allowed_hosts`` (``*.example.com`` allows that domain's subdomains). Else a 422 naming the field."""
    def refuse(why: str) -> ApiError:
        return ApiError(422, "invalid_input", f"webhook: {why}", field="webhook")

    if not allowed_hosts:
        raise refuse("this server calls no webhooks (its operator allows no hosts: TTA_WEBHOOK_HOSTS)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse("must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise refuse("must not carry credentials")
    host = parts.hostname.lower()
    candidates = {host} | ({f"{host}:{port}"} if port else set())
    for allowed in allowed_hosts:
        if allowed in candidates or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return url
    raise refuse(f"host {host!r} is not one this server may call")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """For receivers: the signature header is ours for this body, made within ``tolerance_s``."""
    try:
        fields = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


async def deliver(url: str, payload: dict, secret: str = "", attempts: int = 3, timeout: float = 10.0,
                  backoff_s: float = 1.0) -> dict:
    """POST ``payload`` as JSON to ``url`` until a 2xx (at most ``attempts`` tries, on connection errors and 5xx;
    redirects are not followed: they could lead off the allowed hosts). Returns the delivery's record: state
    ("delivered" or "failed"), attempts, the last HTTP status."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    record: dict = {"state": "failed", "attempts": 0, "http_status": None}
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            headers = {"Content-Type": "application/json", "User-Agent": "tta-webhook",
                       "X-TTA-Job-Id": str(payload.get("id", ""))}
            if secret:
                headers[SIGNATURE_HEADER] = sign(secret, int(time.time()), body)
            record["attempts"] = attempt
            try:
                r = await client.post(url, content=body, headers=headers)
                record["http_status"] = r.status_code
                if 200 <= r.status_code < 300:
                    record["state"] = "delivered"
                    return record
                if r.status_code < 500:
                    break  # the receiver refused it: trying again would not change that
            except httpx.HTTPError as exc:
                record["http_status"] = None
                log.warning("webhook call failed", extra={"job_id": payload.get("id"), "error": type(exc).__name__})
            if attempt < attempts:
                await asyncio.sleep(backoff_s * attempt)
    log.warning("webhook not delivered", extra={"job_id": payload.get("id"), "attempts": record["attempts"],
                                                "status": record["http_status"]})
    return record
