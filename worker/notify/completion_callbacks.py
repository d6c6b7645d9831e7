"""Completion callbacks: POST a finished task's public JSON to its ``callback_url``, signed.

Signed as Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)
with the owner's own secret or ``TASKMAN_CALLBACK_SECRET``, and, deprecated, with
``X-Taskman-Timestamp`` and ``X-Taskman-Signature``: worker.notify.signing.
docs/callbacks.md has the receiver's recipe.
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
from worker.notify.owner_secrets import SecretsUnavailable
from worker.notify.refusals import RefusedCallbacks
from worker.notify.signing import CallbackSigner, legacy_signature
from worker.remote.backoff import parse_retry_after
from worker.remote.headers import headers_problem
from worker.remote.netguard import BlockedURL, InvalidHostName, NetworkPolicy, guarded_session

DELIVERY_HEADER = "X-Taskman-Delivery"
EVENT_HEADER = "X-Taskman-Event"
USER_AGENT = "taskman-callbacks/0.1"
# Header names only Taskman sends (a task's callback_headers with them are left out).
RESERVED = ("x-taskman-", "webhook-")
# How much of a receiver's error answer is kept (service-only) to help diagnose it.
KEPT_ERROR_BODY = 500


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The deprecated ``X-Taskman-Signature`` value for ``body`` sent at ``timestamp``."""
    return legacy_signature(hmac.new(secret.encode(), digestmod=hashlib.sha256), timestamp, body)


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> bool:
    """Whether a callback's deprecated ``X-Taskman-Signature`` is genuine and recent.

    ``timestamp`` and ``signature`` are the header values as received; a timestamp
    more than ``tolerance_seconds`` away from ``now`` fails, which stops replays. It
    proves the body is Taskman's, no more: the receiver still checks the body's
    ``callback_url``, ``user_id`` and ``task_id`` (docs/callbacks.md).
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
    are not followed. ``signer`` signs them (the worker's, ``signing.worker_signing``:
    owners' own secrets, then ``secret``); without one, ``secret`` alone (None:
    unsigned). Refusals by the network policy are reported
    to `refusals` (a log line and a counter).
    """

    def __init__(self, http: aiohttp.ClientSession, secret: str | None,
                 refusals: RefusedCallbacks | None = None, *,
                 signer: CallbackSigner | None = None) -> None:
        self._http = http
        self._signer = signer or CallbackSigner(secret)
        self._refusals = refusals or RefusedCallbacks()

    async def deliver(self, outbox_id: int, payload: Mapping[str, Any],
                      extra_headers: Mapping[str, str] | None = None) -> Delivery:
        """POST ``payload`` to its ``callback_url``: any 2xx answer is a delivery.

        ``extra_headers`` (the task's callback_headers) go out too; Taskman's own
        headers (signatures included, ``webhook-*``) cannot be overridden by them."""
        url = payload.get("callback_url")
        if not url:
            return Delivery("given_up", reason="no_callback_url")
        try:
            body = callback_body(payload)
        except (ValueError, TypeError, RecursionError) as exc:
            return Delivery("failed", reason="unserializable_payload",
                            error=f"the task's JSON could not be written out: {exc!r}"[:500])
        try:
            signed = await self._signer.headers(outbox_id, payload.get("user_id"),
                                                int(time.time()), body)
        except SecretsUnavailable as exc:
            return Delivery("failed", reason="signing_secrets_unavailable", error=str(exc))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: str(outbox_id),
            EVENT_HEADER: f"task.{payload.get('status')}",
            **signed,
        }
        if extra_headers:
            if problem := headers_problem(extra_headers, "callback"):
                return Delivery("given_up", reason="invalid_headers",
                                error=f"callback_headers cannot be sent: {problem}"[:500])
            ours = {name.lower() for name in headers}
            headers = {**{k: v for k, v in extra_headers.items()
                          if k.lower() not in ours and not k.lower().startswith(RESERVED)},
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
