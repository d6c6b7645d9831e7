"""Polling one claimed task: a safe, bounded HTTP request and the outcome to record for it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from worker.config import Settings
from worker.domain import ClaimedTask, PollOutcome
from worker.polling.profile_cache import ProfileCache
from worker.remote import backoff
from worker.remote.bodies import ACCEPT_ENCODING, ResponseTooLarge, UndecodableBody, read_capped
from worker.remote.headers import headers_problem
from worker.remote.json_bounds import json_problem
from worker.remote.netguard import BlockedURL, InvalidHostName, NetworkPolicy, guarded_session
from worker.remote.profiles import ProfileError, ReadingTooCostly, ResponseProfile, read_response

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# What record_poll_results keeps of a raw body; sending more would only be cut there.
MAX_RAW_RESPONSE = 65_536
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Read size: a body arrives in as many chunks as the network delivers, at most this large.
_CHUNK = 65_536


class RequestNotSendable(Exception):
    """The task's request cannot be built or sent as stored (e.g. a header HTTP cannot carry)."""


class TooManyRedirects(Exception):
    """The status URL redirected more than MAX_REDIRECTS times."""


@dataclass(frozen=True)
class Answer:
    """The final answer to a poll: status, headers (case-insensitive) and decoded body."""

    status_code: int
    headers: CIMultiDictProxy[str]
    body: bytes


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """The aiohttp session all polls share: keep-alive connections, up to ``concurrency``
    of them, every connection and every redirect hop checked by the network policy.

    Redirects are followed by the Poller, not aiohttp, so that it can drop the task's
    headers (often an API key) when a redirect leaves the origin. Per-host limits are the
    worker's (``per_host_concurrency``), not the connector's. Needs a running event loop.
    """
    policy = NetworkPolicy.from_settings(settings)
    seconds = settings.poll_timeout_seconds
    return guarded_session(
        policy,
        limit=settings.concurrency,
        # Connecting; the whole poll (redirects and every read included) is bounded by
        # the same figure in Poller._poll, so a read timeout of its own could never
        # fire first (and would cost a timer reset per chunk read).
        timeout=aiohttp.ClientTimeout(total=None, connect=seconds),
        headers={"User-Agent": "taskman", "Accept": "application/json",
                 "Accept-Encoding": ACCEPT_ENCODING},
    )


class Poller:
    """Polls claimed tasks and turns each answer into one ``record_poll_results`` outcome."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        worker_id: str,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._session = session
        self.settings = settings
        self.worker_id = worker_id
        self.rand = rand
        self._profiles = ProfileCache(settings.profile_cache_bytes)

    async def poll(self, task: ClaimedTask) -> PollOutcome:
        """Poll `task` once. Never raises: whatever the remote, the network or the task's own
        data does, the result is an outcome for this task alone."""
        outcome: PollOutcome = {"task_id": task.task_id, "worker_id": self.worker_id}
        try:
            return outcome | await self._poll(task)
        except Exception as exc:
            log.exception("polling task %s failed unexpectedly", task.task_id,
                          extra={"task_id": task.task_id})
            message = f"Taskman could not complete the poll (unexpected {type(exc).__name__})."
            return outcome | _failed("poll_error", "unexpected_error", message,
                                     raw_error=repr(exc)[:1000])

    async def _poll(self, task: ClaimedTask) -> PollOutcome:
        try:
            profile = self._profiles.get(task.profile)
        except ProfileError as exc:
            return _failed("invalid_response", "invalid_profile",
                           f"poll_config is not usable: {exc}")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.poll_timeout_seconds):
                answer = await self._fetch(task)
        except BlockedURL as exc:
            return _failed("poll_error", "blocked_by_network_policy", str(exc),
                           raw_error=exc.detail)
        except (InvalidHostName, aiohttp.InvalidURL) as exc:
            return _failed("poll_error", "invalid_url", f"the URL is not valid: {exc}")
        except TooManyRedirects:
            return _failed("poll_error", "redirect_loop",
                           f"the status URL redirected more than {MAX_REDIRECTS} times")
        except RequestNotSendable as exc:
            # What Taskman would send is not valid HTTP: sending it again will not help.
            return _failed("poll_error", "invalid_request",
                           f"the request could not be sent: {exc}")
        except TRANSIENT_ERRORS as exc:
            return retry_outcome(self.settings, task, self.rand,
                                 *transient_failure(exc, self.settings))
        latency: PollOutcome = {"latency_ms": (time.perf_counter() - started) * 1000}
        return latency | self._interpret(task, profile, answer)

    async def _fetch(self, task: ClaimedTask) -> Answer:
        """Send the task's request and follow redirects, reading at most max_response_bytes."""
        if task.poll_url is None:
            raise RequestNotSendable("the task has no status URL")
        method, url = task.poll_method, _url(task.poll_url)
        headers, body = task.poll_headers or {}, task.poll_body
        if headers and (problem := headers_problem(headers)):
            raise RequestNotSendable(problem)
        for _ in range(MAX_REDIRECTS + 1):
            sent = headers
            data = None
            if body is not None:
                data = body.encode()
                if not any(k.lower() == "content-type" for k in headers):
                    sent = {**headers, "Content-Type": "application/json"}
            try:
                response = await self._session.request(
                    method, url, headers=sent, data=data, allow_redirects=False)
            except (ValueError, TypeError) as exc:  # e.g. a method aiohttp cannot send
                if isinstance(exc, aiohttp.ClientError):
                    raise
                raise RequestNotSendable(str(exc)) from None
            try:
                location = response.headers.get("location")
                if response.status not in _REDIRECTS or location is None:
                    body_read = await read_capped(response.headers,
                                                  response.content.iter_chunked(_CHUNK),
                                                  self.settings.max_response_bytes)
                    return Answer(response.status, response.headers, body_read)
            finally:
                response.release()
            target = url.join(_url(location))
            if _origin(target) != _origin(url):
                headers = {}  # the task's headers are for its own API, not for wherever it points
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            url = target
        raise TooManyRedirects

    def _interpret(self, task: ClaimedTask, profile: ResponseProfile, answer: Answer
                   ) -> PollOutcome:
        code, body = answer.status_code, answer.body
        raw = body[:MAX_RAW_RESPONSE].decode("utf-8", "replace").replace("\x00", "\ufffd")
        seen: PollOutcome = {"http_status": code, "raw_response": raw}
        if backoff.is_transient_status(code):
            wait = _retry_after(answer) if code in (429, 503) else None
            retry = retry_outcome(self.settings, task, self.rand, "http_status", f"HTTP {code}",
                                  wait=wait)
            if code == 429 and wait is not None:
                retry["retry_after_seconds"] = wait  # its owner's tasks on the host pause too
            return seen | retry
        if 400 <= code < 500:
            message = f"The status endpoint refused the request (HTTP {code})."
            return seen | _failed("poll_error", "http_status", message, raw_error=f"HTTP {code}")
        try:
            reading = read_response(profile, code, answer.headers, body,
                                    self.settings.expression_budget)
        except ReadingTooCostly as exc:
            message = (f"The answer could not be read within Taskman's evaluation budget: "
                       f"{exc}. Simplify the response profile's expressions.")
            return seen | _failed("invalid_response", "evaluation_budget", message)
        progress: PollOutcome = {"progress": reading.progress,
                                 "progress_message": reading.progress_message}
        if reading.state == "unreadable":
            return seen | retry_outcome(self.settings, task, self.rand, "unreadable_answer",
                                        reading.reason, unreadable=True)
        if reading.state == "completed":
            if problem := json_problem(reading.result):
                # Stored, it could not be served: the task fails, its batch is recorded.
                return seen | _failed("invalid_response", "unservable_result",
                                      f"The answer's result cannot be stored: it {problem}.")
            return {**seen, "ok": True, "status": "completed", "result": reading.result}
        if reading.state == "failed":
            # The poll itself worked (ok); error_message stays null, so the database
            # writes its neutral sentence, and the remote's own text stays raw_error.
            return {**seen, **progress, "ok": True, "status": "failed",
                    "error_code": "remote_failed", "raw_error": reading.error_detail}
        if reading.state == "cancelled":
            # Not a failure: no alert; the database writes the neutral message.
            return {**seen, "ok": True, "status": "cancelled", "raw_error": reading.error_detail}
        # The remote's hint (Retry-After on a 202) may shorten the wait, down to the floor.
        wait = _retry_after(answer) if code == 202 else None
        if reading.state == "running":
            if wait is None:
                wait = backoff.running_interval(
                    task.poll_interval_seconds,
                    task.attempt_count + 1,
                    self.settings.max_poll_interval_seconds,
                )
            return {**seen, **progress, "ok": True, "status": "in_progress",
                    "delay_seconds": self._floored(wait)}
        delay = task.poll_interval_seconds if wait is None else wait
        return {**seen, **progress, "ok": True, "delay_seconds": self._floored(delay)}

    def _floored(self, seconds: float) -> float:
        return max(self.settings.min_poll_interval_seconds, seconds)


# What a request can fail with that is worth sending again (after the guard's refusals and
# the bad requests, which are final): see transient_failure.
TRANSIENT_ERRORS = (ResponseTooLarge, UndecodableBody, TimeoutError, aiohttp.ClientError, OSError)


def transient_failure(exc: BaseException, settings: Settings) -> tuple[str, str, bool]:
    """The reason, raw error and whether the answer was unreadable, of one of
    TRANSIENT_ERRORS."""
    if isinstance(exc, ResponseTooLarge):
        raw = f"the answer exceeded {settings.max_response_bytes} bytes"
        return "response_too_large", raw, True
    if isinstance(exc, UndecodableBody):
        return "undecodable_body", str(exc), True
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors
        raw = str(exc) or "no answer within the poll timeout"
        return "timeout", f"{type(exc).__name__}: {raw}", False
    return "connection_error", network_error(exc), False


def retry_outcome(
    settings: Settings, task: ClaimedTask, rand: Callable[[], float], reason: str,
    raw_error: str | None,
    unreadable: bool = False, *, wait: float | None = None,
) -> PollOutcome:
    """A transient failure: counts toward max_attempts, sent again after a backoff (or the
    remote's Retry-After), never sooner than the floor."""
    if wait is None:
        wait = backoff.retry_delay(task.error_count + 1, settings.retry_base_seconds,
                                   settings.retry_max_seconds, rand(),
                                   floor=settings.min_poll_interval_seconds)
    outcome: PollOutcome = {"ok": False,
                            "delay_seconds": max(settings.min_poll_interval_seconds, wait),
                            "reason": reason, "raw_error": raw_error}
    if unreadable:
        outcome["error_code"] = "invalid_response"
    return outcome


def _failed(
    code: Literal["poll_error", "invalid_response"], reason: str, message: str,
    raw_error: str | None = None,
) -> PollOutcome:
    """A final failure: the task ends with `code`; `message` is shown to its owner and
    `reason` (a short code) in its events."""
    return {"ok": False, "status": "failed", "error_code": code, "reason": reason,
            "error_message": message, "raw_error": raw_error or message}


def _retry_after(answer: Answer) -> float | None:
    return backoff.parse_retry_after(answer.headers.get("retry-after"), datetime.now(UTC))


def _url(text: str) -> URL:
    """`text` as a URL; yarl keeps it as written (encoded=True would refuse nothing)."""
    try:
        return URL(text)
    except (ValueError, TypeError) as exc:
        raise aiohttp.InvalidURL(text[:200], str(exc)) from None


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


# Names operators already query raw_error by (they were httpx's), for aiohttp's errors.
_ERROR_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
    (aiohttp.ClientPayloadError, "RemoteProtocolError"),
    (aiohttp.ClientResponseError, "RemoteProtocolError"),
)


def network_error(exc: BaseException) -> str:
    """`exc` for raw_error: a stable kind, then what went wrong."""
    name = next((n for kind, n in _ERROR_NAMES if isinstance(exc, kind)), type(exc).__name__)
    return f"{name}: {exc}"
