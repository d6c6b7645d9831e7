"""Submitting a claimed task: the one request that starts its remote job.

Sent with ``Idempotency-Key: <task_id>`` through the polls' session (the same network
policy, timeouts and size cap), redirects not followed. A submit that hands the remote
``{callback_url}`` has ``<task_id>.<digest of the callback token>``: a retry gives the
task a new token, so its submit carries a new URL and needs a key of its own. The answer
becomes one ``record_poll_results`` outcome with ``submitted: true``:

- a handle (``worker.remote.handles``): the job is started, polled from then on;
- an answer that already says completed or failed (a synchronous API): the task ends;
- no handle, but the request handed the remote ``{callback_url}``: it waits for the call;
- a transient failure (network, 408/425/429/5xx): retried with backoff, counting toward
  max_attempts, with the same Idempotency-Key;
- any other refusal: ``submit_failed``; an answer without a handle: ``invalid_response``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from yarl import URL

from worker.config import Settings
from worker.domain import ClaimedTask, PollOutcome
from worker.polling.poller import (
    MAX_RAW_RESPONSE,
    TRANSIENT_ERRORS,
    retry_outcome,
    transient_failure,
)
from worker.polling.profile_cache import ProfileCache
from worker.remote import backoff
from worker.remote.bodies import read_capped
from worker.remote.handles import NoHandle, fill_placeholders, read_handle, uses_placeholder
from worker.remote.headers import headers_problem
from worker.remote.netguard import BlockedURL, InvalidHostName
from worker.remote.profiles import ProfileError, ReadingTooCostly, read_response

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_CHUNK = 65_536


class _NotSendable(Exception):
    """The submit request cannot be built or sent as stored."""


class Submitter:
    """Sends claimed tasks' submit requests and turns each answer into an outcome."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, worker_id: str,
                 rand: Callable[[], float] = random.random) -> None:
        self._session = session
        self.settings = settings
        self.worker_id = worker_id
        self.rand = rand
        self._profiles = ProfileCache(settings.profile_cache_bytes)

    async def submit(self, task: ClaimedTask) -> PollOutcome:
        """Submit `task` once. Never raises: the result is an outcome for this task alone."""
        outcome: PollOutcome = {"task_id": task.task_id, "worker_id": self.worker_id,
                                "submitted": True}
        try:
            return outcome | await self._submit(task)
        except Exception as exc:
            log.exception("submitting task %s failed unexpectedly", task.task_id,
                          extra={"task_id": task.task_id})
            message = f"Taskman could not send the submit (unexpected {type(exc).__name__})."
            return outcome | _failed("submit_failed", "unexpected_error", message, repr(exc))

    async def _submit(self, task: ClaimedTask) -> PollOutcome:
        try:
            profile = json.loads(task.profile)
            reader = self._profiles.get(task.profile)
        except (ValueError, ProfileError) as exc:
            return _failed("invalid_response", "invalid_profile",
                           f"poll_config is not usable: {exc}")
        try:
            method, url, headers, data = self._request(task)
        except _NotSendable as exc:
            return _failed("submit_failed", "invalid_request",
                           f"the submit could not be sent: {exc}")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.poll_timeout_seconds):
                status, answer_headers, body = await self._send(method, url, headers, data)
        except BlockedURL as exc:
            return _failed("submit_failed", "blocked_by_network_policy", str(exc), exc.detail)
        except (InvalidHostName, aiohttp.InvalidURL) as exc:
            return _failed("submit_failed", "invalid_url", f"the submit URL is not valid: {exc}")
        except _NotSendable as exc:
            return _failed("submit_failed", "invalid_request",
                           f"the submit could not be sent: {exc}")
        except TRANSIENT_ERRORS as exc:
            return retry_outcome(self.settings, task, self.rand,
                                 *transient_failure(exc, self.settings))
        raw = body[:MAX_RAW_RESPONSE].decode("utf-8", "replace").replace("\x00", "\ufffd")
        seen: PollOutcome = {"http_status": status, "raw_response": raw,
                             "latency_ms": (time.perf_counter() - started) * 1000}
        if backoff.is_transient_status(status):
            wait = backoff.parse_retry_after(answer_headers.get("retry-after"), _now())
            retry = retry_outcome(self.settings, task, self.rand, "http_status",
                                  f"HTTP {status}", wait=wait)
            if status == 429 and wait is not None:
                retry["retry_after_seconds"] = wait  # its owner's tasks on the host pause too
            return seen | retry
        if not (200 <= status < 300 or status == 303):
            message = f"The remote refused the request that starts the job (HTTP {status})."
            return seen | _failed("submit_failed", "http_status", message, f"HTTP {status}")
        try:
            handle = read_handle(profile, url, status, answer_headers, body,
                                 self.settings.expression_budget)
            reading = None if handle is not None or status == 303 else read_response(
                reader, status, answer_headers, body, self.settings.expression_budget)
        except NoHandle as exc:  # what the remote sent stays service-side
            return seen | _failed("invalid_response", "invalid_handle",
                                  "The submit's answer names no usable job handle.",
                                  f"The submit's answer names no usable job handle: {exc}.")
        except ProfileError as exc:  # ReadingTooCostly included
            why = "evaluation_budget" if isinstance(exc, ReadingTooCostly) else "invalid_profile"
            return seen | _failed("invalid_response", why,
                                  f"The submit's answer could not be read: {exc}.")
        if reading is not None and reading.state == "completed":
            return {**seen, "ok": True, "status": "completed", "result": reading.result}
        if reading is not None and reading.state == "failed":
            return {**seen, "ok": True, "status": "failed", "error_code": "remote_failed",
                    "raw_error": reading.error_detail}
        if handle is None and not self._hands_callback_url(task):
            return seen | _failed(
                "invalid_response", "no_handle",
                "The submit's answer names no job handle: no Location header (201, 202 or "
                "303), and the profile's poll_url_path or job_id_path found nothing.")
        accepted: PollOutcome = {**seen, "ok": True, "status": "in_progress",
                                 "delay_seconds": self._first_poll_delay(task, answer_headers)}
        if handle is not None:
            accepted["poll_url"] = handle.poll_url
        if handle is not None and handle.job_id is not None:
            accepted["external_id"] = handle.job_id
        return accepted

    def _request(self, task: ClaimedTask) -> tuple[str, str, dict[str, str], bytes | None]:
        """The method, URL, headers and body to send, placeholders filled in."""
        assert task.submit_url is not None
        values = {"task_id": task.task_id}
        stored = task.submit_headers or {}
        if self._hands_callback_url(task):
            if self.settings.public_url is None or task.callback_token is None:
                raise _NotSendable("{callback_url} needs TASKMAN_PUBLIC_URL, the edge's public "
                                   "URL, which is not set")
            values["callback_url"] = (f"{self.settings.public_url}/callbacks/{task.task_id}"
                                      f"?token={quote(task.callback_token, safe='')}")
        headers = {name: fill_placeholders(value, values) for name, value in stored.items()}
        if problem := headers_problem(headers, "submit"):
            raise _NotSendable(problem)
        headers[IDEMPOTENCY_HEADER] = idempotency_key(task)
        data = None
        if task.submit_body is not None:
            data = json.dumps(fill_placeholders(json.loads(task.submit_body), values)).encode()
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        return task.submit_method or "POST", task.submit_url, headers, data

    async def _send(self, method: str, url: str, headers: dict[str, str], data: bytes | None
                    ) -> tuple[int, Any, bytes]:
        try:
            target = URL(url)
        except (ValueError, TypeError) as exc:
            raise aiohttp.InvalidURL(url[:200], str(exc)) from None
        try:
            response = await self._session.request(method, target, headers=headers, data=data,
                                                   allow_redirects=False)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, aiohttp.ClientError):
                raise
            raise _NotSendable(str(exc)) from None
        try:
            body = await read_capped(response.headers, response.content.iter_chunked(_CHUNK),
                                     self.settings.max_response_bytes)
            return response.status, response.headers, body
        finally:
            response.release()

    @staticmethod
    def _hands_callback_url(task: ClaimedTask) -> bool:
        texts = [task.submit_body, *(task.submit_headers or {}).values()]
        return uses_placeholder(texts, "callback_url")

    def _first_poll_delay(self, task: ClaimedTask, headers: Any) -> float:
        wait = backoff.parse_retry_after(headers.get("retry-after"), _now())
        seconds = task.poll_interval_seconds if wait is None else wait
        return max(self.settings.min_poll_interval_seconds, seconds)


def idempotency_key(task: ClaimedTask) -> str:
    """The submit's Idempotency-Key: the task id, the same for each send of one run; with
    the digest of the callback token when the submit hands it over (new on retry)."""
    if task.callback_token is None:
        return task.task_id
    digest = hashlib.sha256(task.callback_token.encode()).hexdigest()[:16]
    return f"{task.task_id}.{digest}"


def _failed(code: Literal["submit_failed", "invalid_response"], reason: str, message: str,
            raw_error: str | None = None) -> PollOutcome:
    """A final failure of the submit: `message` is shown to the owner."""
    return {"ok": False, "status": "failed", "error_code": code, "reason": reason,
            "error_message": message, "raw_error": raw_error or message}


def _now() -> datetime:
    return datetime.now(UTC)
