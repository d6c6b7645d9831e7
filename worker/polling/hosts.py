"""Remote hosts as all workers see them: the gate after each claim and the host side of
each batch of outcomes (circuit breaker, Retry-After pauses, rate limits).

The state lives in ``taskman_private.hosts``; each call here is one statement for a
whole batch, made in the transaction of the claim or of the record it goes with.
Polls and submits both go through it: a claimed task's request is to its submit URL
until the submit worked, then to its poll URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import psycopg

from worker import store
from worker.config import Settings
from worker.domain import ClaimedTask
from worker.remote.host_keys import host_key

log = logging.getLogger(__name__)

# Reasons a request never got an answer from its host (poller.py's retry reasons).
_TRANSPORT_ERRORS = frozenset({"connection_error", "timeout"})

HostVerdict = Literal["success", "failure"]


def host_verdict(outcome: Mapping[str, Any]) -> HostVerdict | None:
    """What one request's outcome says about its host: ``failure`` for a transport
    error, a 5xx or a 429; ``success`` for any other answer (a 404 or an unreadable
    body is the task's own problem, and shows the host is up); None when no request
    reached the network (blocked by policy, an invalid URL)."""
    status = outcome.get("http_status")
    if status is not None:
        return "failure" if status >= 500 or status == 429 else "success"
    if outcome.get("reason") in _TRANSPORT_ERRORS:
        return "failure"
    return None


class HostGate:
    """One worker's side of the shared host table."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self._limits_applied = not settings.host_rate_limits

    def _timing(self) -> dict[str, float]:
        s = self.settings
        return {"cooldown_seconds": s.host_cooldown_seconds,
                "max_cooldown_seconds": s.host_max_cooldown_seconds,
                "spread_seconds": s.host_resume_spread_seconds}

    async def admit_tasks(self, conn: psycopg.AsyncConnection[Any],
                          claimed: Sequence[ClaimedTask]) -> list[ClaimedTask]:
        """The claimed tasks to send now (each to its submit or poll URL's host); the others
        went back to the schedule for when their hosts have room. The first call applies
        TASKMAN_HOST_RATE_LIMITS."""
        await self._apply_limits(conn)
        if not claimed:
            return []
        held = await self.hold(conn, [(str(t.task_id), host_key(t.request_url))
                                      for t in claimed])
        return [t for t in claimed if str(t.task_id) not in held]

    async def hold(self, conn: psycopg.AsyncConnection[Any],
                   requests: Sequence[tuple[str, str | None]]) -> set[str]:
        """Of ``(task_id, host)`` pairs about to be sent (tasks this worker leases), the
        task ids their hosts hold back: they are back in the schedule, not to be sent."""
        await self._apply_limits(conn)
        return await store.admit_tasks(conn, self.worker_id, requests, **self._timing())

    async def _apply_limits(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """TASKMAN_HOST_RATE_LIMITS into the host table, once per worker."""
        if self._limits_applied:
            return
        changed = await store.set_host_limits(
            conn, dict[str, float | None](self.settings.host_rate_limits))
        self._limits_applied = True
        log.info("host rate limits applied (%d changed)", changed,
                 extra={"hosts": sorted(self.settings.host_rate_limits)})

    async def report(self, conn: psycopg.AsyncConnection[Any],
                     outcomes: Iterable[Mapping[str, Any]]) -> set[str]:
        """Record what finished requests (outcomes with ``host``, and ``task_id`` for
        polls and submits) say about their hosts; returns the task ids of failed
        requests held back because their host is open or paused: they go back to the
        schedule, and must not be recorded (they do not spend their task's error
        budget)."""
        reports = []
        for outcome in outcomes:
            verdict = host_verdict(outcome)
            host = outcome.get("host")
            if verdict is None or host is None:
                continue
            reports.append({"task_id": outcome.get("task_id"), "host": host,
                            "result": verdict,
                            "error": _error(outcome) if verdict == "failure" else None,
                            "retry_after_seconds": outcome.get("retry_after_seconds")})
        # Of a host's successes only the last one tells the database anything (that the
        # failures before it are not consecutive): a healthy batch sends a row per host.
        last_success = {r["host"]: i for i, r in enumerate(reports) if r["result"] == "success"}
        reports = [r for i, r in enumerate(reports)
                   if r["result"] == "failure" or last_success[r["host"]] == i]
        if not reports:
            return set()
        return await store.record_host_outcomes(
            conn, self.worker_id, reports,
            failure_threshold=self.settings.host_failure_threshold, **self._timing())


def _error(outcome: Mapping[str, Any]) -> str:
    """A failure's short code: ``http_503``, ``connection_error``, ``timeout``."""
    status = outcome.get("http_status")
    return f"http_{status}" if status is not None else str(outcome.get("reason"))
