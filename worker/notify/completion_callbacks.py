"""Completion callbacks: POST a finished task's public JSON to its ``callback_url``, signed.

The signature is ``sha256=<hex>`` of HMAC-SHA256 over ``"<timestamp>.<body>"`` with
``TASKMAN_CALLBACK_SECRET``, sent in ``X-Taskman-Signature`` beside
``X-Taskman-Timestamp`` (Unix seconds). docs/callbacks.md has the receiver's recipe.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from worker.config import Settings
from worker.notify.delivery import Delivery
from worker.notify.refusals import RefusedCallbacks
from worker.remote.backoff import parse_retry_after
from worker.remote.headers import headers_problem
from worker.remote.netguard import BlockedURL, InvalidHostName, NetworkPolicy, guarded_session

SIGNATURE_HEADER = "X-Taskman-Signature"
TIMESTAMP_HEADER = "X-Taskman-Timestamp"
DELIVERY_HEADER = "X-Taskman-Delivery"
EVENT_HEADER = "X-Taskman-Event"
USER_AGENT = "taskman-callbacks/0.1"
# How much of a receiver's error answer is kept (service-only) to help diagnose it.
KEPT_ERROR_BODY = 500


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Taskman-Signature`` value for ``body`` sent at ``timestamp``."""
    return _signed(hmac.new(secret.encode(), digestmod=hashlib.sha256), timestamp, body)


def _signed(keyed: hmac.HMAC, timestamp: int, body: bytes) -> str:
    """``sign`` with the secret's HMAC state already keyed (it is copied, not changed)."""
    mac = keyed.copy()
    mac.update(b"%d." % timestamp)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> bool:
    """Whether a received callback is genuine and recent (for Python receivers).

    ``timestamp`` and ``signature`` are the header values as received; a timestamp
    more than ``tolerance_seconds`` away from ``now`` fails, which stops replays.
    """
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, sent_at, body), signature)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def callback_body(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): the task's public JSON, compact UTF-8."""
    return _COMPACT.encode(payload).encode()


def callback_client(settings: Settings) -> aiohttp.ClientSession:
    """A session for callbacks that obeys the worker's network policy (no private
    addresses unless allowed, checked on the address connected to) and ignores proxy
    variables. Use it as ``async with callback_client(settings) as http``, inside the
    event loop that sends."""
    policy = NetworkPolicy(
        allow_private=settings.allow_private_networks, allowed_hosts=settings.allowed_hosts
    )
    return guarded_session(
        policy, limit=settings.concurrency,
        timeout=aiohttp.ClientTimeout(total=settings.callback_timeout_seconds),
        # Error answers are kept as their first bytes, never decompressed.
        headers={"Accept-Encoding": "identity"},
    )


class CallbackSender:
    """POSTs callbacks with a session the caller provides.

    Build it with ``callback_client`` (worker.remote.netguard's guarded_session) so
    callback URLs, which users choose, obey the same network policy as polls. Redirects
    are not followed. Without a secret, callbacks go out unsigned. Refusals by the
    network policy are reported to `refusals` (a log line and a counter).
    """

    def __init__(self, http: aiohttp.ClientSession, secret: str | None,
                 refusals: RefusedCallbacks | None = None) -> None:
        self._http = http
        self._keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256) if secret else None
        self._refusals = refusals or RefusedCallbacks()

    async def deliver(self, outbox_id: int, payload: Mapping[str, Any],
                      extra_headers: Mapping[str, str] | None = None) -> Delivery:
        """POST ``payload`` to its ``callback_url``: any 2xx answer is a delivery.

        ``extra_headers`` (the task's callback_headers) go out too; Taskman's own
        headers cannot be overridden by them."""
        url = payload.get("callback_url")
        if not url:
            return Delivery("given_up", reason="no_callback_url")
        try:
            body = callback_body(payload)
        except (ValueError, TypeError, RecursionError) as exc:
            return Delivery("failed", reason="unserializable_payload",
                            error=f"the task's JSON could not be written out: {exc!r}"[:500])
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: str(outbox_id),
            EVENT_HEADER: f"task.{payload.get('status')}",
            TIMESTAMP_HEADER: str(timestamp),
        }
        if self._keyed is not None:
            headers[SIGNATURE_HEADER] = _signed(self._keyed, timestamp, body)
        if extra_headers:
            if problem := headers_problem(extra_headers, "callback"):
                return Delivery("given_up", reason="invalid_headers",
                                error=f"callback_headers cannot be sent: {problem}"[:500])
            ours = {name.lower() for name in headers} | {SIGNATURE_HEADER.lower()}
            headers = {**{k: v for k, v in extra_headers.items()
                          if k.lower() not in ours and not k.lower().startswith("x-taskman-")},
                       **headers}
        started = time.perf_counter()
        try:
            async with self._http.post(url, data=body, headers=headers,
                                       allow_redirects=False) as response:
                status = response.status
                excerpt = b"" if 200 <= status < 300 else await _first_bytes(response)
                retry_after = response.headers.get("retry-after")
        except BlockedURL as exc:
            self._refusals.report(payload, exc)
            return Delivery("given_up", reason="blocked_by_network_policy", error=exc.detail)
        except (InvalidHostName, aiohttp.InvalidURL, ValueError) as exc:
            return Delivery("given_up", reason="invalid_url",
                            error=f"the callback URL is not valid: {exc}"[:500])
        except TimeoutError as exc:
            return Delivery("failed", reason="timeout", error=f"timeout: {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Delivery("failed", reason="connection_error", error=error)
        latency_ms = (time.perf_counter() - started) * 1000
        if 200 <= status < 300:
            return Delivery("delivered", http_status=status, latency_ms=latency_ms)
        return Delivery(
            "failed",
            reason="http_status",
            http_status=status,
            latency_ms=latency_ms,
            retry_after_seconds=parse_retry_after(retry_after, datetime.now(UTC)),
            error=f"HTTP {status}: {excerpt.decode(errors='replace')}",
        )


async def _first_bytes(response: aiohttp.ClientResponse) -> bytes:
    """The start of an error answer, without reading a large body to its end."""
    kept = b""
    async for chunk in response.content.iter_chunked(KEPT_ERROR_BODY):
        kept += chunk
        if len(kept) >= KEPT_ERROR_BODY:
            break
    return kept[:KEPT_ERROR_BODY]
