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

import httpx

from worker.config import Settings
from worker.notify.delivery import Delivery
from worker.remote.backoff import parse_retry_after
from worker.remote.netguard import BlockedURL, GuardedTransport, NetworkPolicy

SIGNATURE_HEADER = "X-Taskman-Signature"
TIMESTAMP_HEADER = "X-Taskman-Timestamp"
DELIVERY_HEADER = "X-Taskman-Delivery"
EVENT_HEADER = "X-Taskman-Event"
USER_AGENT = "taskman-callbacks/0.1"
# How much of a receiver's error answer is kept (service-only) to help diagnose it.
KEPT_ERROR_BODY = 500


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Taskman-Signature`` value for ``body`` sent at ``timestamp``."""
    message = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


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


def callback_body(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): the task's public JSON, compact UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def callback_client(settings: Settings) -> httpx.AsyncClient:
    """An httpx client for callbacks that obeys the worker's network policy (no private
    addresses unless allowed), does not follow redirects and ignores proxy variables."""
    policy = NetworkPolicy(
        allow_private=settings.allow_private_networks, allowed_hosts=settings.allowed_hosts
    )
    return httpx.AsyncClient(
        transport=GuardedTransport(policy),
        trust_env=False,
        follow_redirects=False,
        timeout=settings.callback_timeout_seconds,
    )


class CallbackSender:
    """POSTs callbacks with an httpx client the caller provides.

    Build the client with worker.remote.netguard's GuardedTransport (and ``trust_env=False``)
    so callback URLs, which users choose, obey the same network policy as polls.
    Without a secret, callbacks go out unsigned.
    """

    def __init__(self, http: httpx.AsyncClient, secret: str | None) -> None:
        self._http = http
        self._secret = secret

    async def deliver(self, outbox_id: int, payload: Mapping[str, Any]) -> Delivery:
        """POST ``payload`` to its ``callback_url``: any 2xx answer is a delivery."""
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
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        started = time.perf_counter()
        try:
            async with self._http.stream("POST", url, content=body, headers=headers) as response:
                excerpt = b"" if response.is_success else await _first_bytes(response)
        except BlockedURL as exc:
            return Delivery("given_up", reason="blocked_by_network_policy", error=str(exc))
        except httpx.TimeoutException as exc:
            return Delivery("failed", reason="timeout", error=f"timeout: {exc}")
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Delivery("failed", reason="connection_error", error=error)
        latency_ms = (time.perf_counter() - started) * 1000
        if response.is_success:
            return Delivery("delivered", http_status=response.status_code, latency_ms=latency_ms)
        return Delivery(
            "failed",
            reason="http_status",
            http_status=response.status_code,
            latency_ms=latency_ms,
            retry_after_seconds=parse_retry_after(
                response.headers.get("retry-after"), datetime.now(UTC)
            ),
            error=f"HTTP {response.status_code}: {excerpt.decode(errors='replace')}",
        )


async def _first_bytes(response: httpx.Response) -> bytes:
    """The start of an error answer, without reading a large body to its end."""
    kept = b""
    async for chunk in response.aiter_bytes():
        kept += chunk
        if len(kept) >= KEPT_ERROR_BODY:
            break
    return kept[:KEPT_ERROR_BODY]
