"""Polling one claimed task: a safe, bounded HTTP request and the outcome to record for it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal

import httpx

from worker.config import Settings
from worker.domain import ClaimedTask, PollOutcome
from worker.polling.profile_cache import ProfileCache
from worker.remote import backoff
from worker.remote.bodies import ACCEPT_ENCODING, ResponseTooLarge, UndecodableBody, read_capped
from worker.remote.headers import headers_problem
from worker.remote.netguard import BlockedURL, GuardedTransport, NetworkPolicy
from worker.remote.profiles import ProfileError, ReadingTooCostly, ResponseProfile, read_response

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# What record_poll_results keeps of a raw body; sending more would only be cut there.
MAX_RAW_RESPONSE = 65_536
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RequestNotSendable(Exception):
    """The task's request cannot be built or sent as stored (e.g. a header HTTP cannot carry)."""


# httpcore's connection pool scans all its connections on every request and response, so
# one pool of N busy connections costs O(N) CPU per poll: at 100 connections that is most
# of the worker's time. Polls are spread round-robin over several clients instead, each
# with about this many connections busy at a time.
CONNECTIONS_PER_CLIENT = 16


def make_clients(settings: Settings) -> list[httpx.AsyncClient]:
    """The clients polls share: keep-alive connections, every hop checked by the network policy.

    Each may open up to ``concurrency`` connections, so an unlucky share of slow polls on one
    client never queues behind its pool. Redirects are followed by the Poller, not httpx,
    so that it can drop the task's headers (often an API key) when a redirect leaves the
    origin.
    """
    policy = NetworkPolicy(settings.allow_private_networks, settings.allowed_hosts)
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    return [
        httpx.AsyncClient(
            transport=GuardedTransport(policy, limits=limits),
            trust_env=False,  # environment proxies would bypass the guarded transport
            follow_redirects=False,
            timeout=settings.poll_timeout_seconds,
            headers={"User-Agent": "taskman", "Accept": "application/json",
                     "Accept-Encoding": ACCEPT_ENCODING},
        )
        for _ in range(client_count(settings.concurrency))
    ]


def client_count(concurrency: int) -> int:
    """How many clients make_clients makes for `concurrency` polls at a time."""
    return -(-concurrency // CONNECTIONS_PER_CLIENT)


class Poller:
    """Polls claimed tasks and turns each answer into one ``record_poll_results`` outcome."""

    def __init__(
        self,
        clients: Sequence[httpx.AsyncClient],
        settings: Settings,
        worker_id: str,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clients = itertools.cycle(clients)
        self.settings = settings
        self.worker_id = worker_id
        self.rand = rand
        self._profiles = ProfileCache(settings.profile_cache_bytes)

    async def poll(self, task: ClaimedTask) -> PollOutcome:
        """Poll `task` once. Never raises: whatever the remote, the network or the task's own
        data does, the result is an outcome for this task alone."""
        outcome: PollOutcome = {"task_id": str(task.task_id), "worker_id": self.worker_id}
        try:
            return outcome | await self._poll(task)
        except Exception as exc:
            log.exception("polling task %s failed unexpectedly", task.task_id,
                          extra={"task_id": str(task.task_id)})
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
                response, body = await self._fetch(task)
        except BlockedURL as exc:
            return _failed("poll_error", "blocked_by_network_policy", str(exc))
        except httpx.InvalidURL as exc:
            return _failed("poll_error", "invalid_url", f"the URL is not valid: {exc}")
        except httpx.TooManyRedirects:
            return _failed("poll_error", "redirect_loop",
                           f"the status URL redirected more than {MAX_REDIRECTS} times")
        except (RequestNotSendable, httpx.LocalProtocolError) as exc:
            # What Taskman would send is not valid HTTP: sending it again will not help.
            return _failed("poll_error", "invalid_request",
                           f"the request could not be sent: {exc}")
        except ResponseTooLarge:
            raw = f"the answer exceeded {self.settings.max_response_bytes} bytes"
            return self._retry(task, "response_too_large", raw, unreadable=True)
        except UndecodableBody as exc:
            return self._retry(task, "undecodable_body", str(exc), unreadable=True)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raw = str(exc) or "no answer within the poll timeout"
            return self._retry(task, "timeout", f"{type(exc).__name__}: {raw}")
        except httpx.RequestError as exc:
            return self._retry(task, "connection_error", f"{type(exc).__name__}: {exc}")
        latency: PollOutcome = {"latency_ms": (time.perf_counter() - started) * 1000}
        return latency | self._interpret(task, profile, response, body)

    async def _fetch(self, task: ClaimedTask) -> tuple[httpx.Response, bytes]:
        """Send the task's request and follow redirects, reading at most max_response_bytes."""
        client = next(self._clients)
        method, url = task.poll_method, httpx.URL(task.poll_url)
        headers, body = task.poll_headers, task.poll_body
        if headers and (problem := headers_problem(headers)):
            raise RequestNotSendable(problem)
        for _ in range(MAX_REDIRECTS + 1):
            sent = headers
            if body is not None and not any(k.lower() == "content-type" for k in headers):
                sent = {**headers, "Content-Type": "application/json"}
            try:
                request = client.build_request(method, url, headers=sent, content=body)
            except (ValueError, TypeError) as exc:  # e.g. a value httpx cannot encode
                raise RequestNotSendable(str(exc)) from None
            response = await client.send(request, stream=True)
            try:
                if not response.is_redirect:
                    return response, await read_capped(
                        response, self.settings.max_response_bytes)
            finally:
                await response.aclose()
            target = url.join(response.headers["location"])
            if _origin(target) != _origin(url):
                headers = {}  # the task's headers are for its own API, not for wherever it points
            if response.status_code == 303 or (
                response.status_code in (301, 302) and method == "POST"
            ):
                method, body = "GET", None
            url = target
        raise httpx.TooManyRedirects("too many redirects", request=request)

    def _interpret(
        self, task: ClaimedTask, profile: ResponseProfile, response: httpx.Response, body: bytes
    ) -> PollOutcome:
        code = response.status_code
        raw = body[:MAX_RAW_RESPONSE].decode("utf-8", "replace").replace("\x00", "\ufffd")
        seen: PollOutcome = {"http_status": code, "raw_response": raw}
        if backoff.is_transient_status(code):
            wait = _retry_after(response) if code in (429, 503) else None
            return seen | self._retry(task, "http_status", f"HTTP {code}", wait=wait)
        if 400 <= code < 500:
            message = f"The status endpoint refused the request (HTTP {code})."
            return seen | _failed("poll_error", "http_status", message, raw_error=f"HTTP {code}")
        try:
            reading = read_response(profile, code, response.headers, body,
                                    self.settings.expression_budget)
        except ReadingTooCostly as exc:
            message = (f"The answer could not be read within Taskman's evaluation budget: "
                       f"{exc}. Simplify the response profile's expressions.")
            return seen | _failed("invalid_response", "evaluation_budget", message)
        progress: PollOutcome = {"progress": reading.progress,
                                 "progress_message": reading.progress_message}
        if reading.state == "unreadable":
            return seen | self._retry(task, "unreadable_answer", reading.reason, unreadable=True)
        if reading.state == "completed":
            return {**seen, "ok": True, "status": "completed", "result": reading.result}
        if reading.state == "failed":
            # The poll itself worked (ok); error_message stays null, so the database
            # writes its neutral sentence, and the remote's own text stays raw_error.
            return {**seen, **progress, "ok": True, "status": "failed",
                    "error_code": "remote_failed", "raw_error": reading.error_detail}
        # The remote's hint (Retry-After on a 202) may shorten the wait, down to the floor.
        wait = _retry_after(response) if code == 202 else None
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

    def _retry(
        self, task: ClaimedTask, reason: str, raw_error: str | None, *,
        wait: float | None = None, unreadable: bool = False,
    ) -> PollOutcome:
        """A transient failure: counts toward max_attempts, polled again after a backoff
        (or the remote's Retry-After), never sooner than the floor."""
        if wait is None:
            wait = backoff.retry_delay(
                task.error_count + 1,
                self.settings.retry_base_seconds,
                self.settings.retry_max_seconds,
                self.rand(),
                floor=self.settings.min_poll_interval_seconds,
            )
        outcome: PollOutcome = {"ok": False, "delay_seconds": self._floored(wait),
                                "reason": reason, "raw_error": raw_error}
        if unreadable:
            outcome["error_code"] = "invalid_response"
        return outcome

    def _floored(self, seconds: float) -> float:
        return max(self.settings.min_poll_interval_seconds, seconds)


def _failed(
    code: Literal["poll_error", "invalid_response"], reason: str, message: str,
    raw_error: str | None = None,
) -> PollOutcome:
    """A final failure: the task ends with `code`; `message` is shown to its owner and
    `reason` (a short code) in its events."""
    return {"ok": False, "status": "failed", "error_code": code, "reason": reason,
            "error_message": message, "raw_error": raw_error or message}


def _retry_after(response: httpx.Response) -> float | None:
    return backoff.parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC))


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)
