"""Remote hosts as all workers see them: the gate after each claim and the host side of
each batch of outcomes (circuit breaker, Retry-After pauses, rate limits).

The state lives in ``taskman_private.hosts``; each call here is one statement for a
whole batch: the claim and the record of polls include the host table's side, and a
report goes in the transaction of the record it goes with.
Polls and submits both go through it: a claimed task's request is to its submit URL
until the submit worked, then to its poll URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import psycopg

from worker import store
from worker.config import Settings
from worker.domain import ClaimedTask

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

    async def claim(self, conn: psycopg.AsyncConnection[Any], batch_size: int,
                    lease_seconds: int) -> list[ClaimedTask]:
        """Claim up to `batch_size` due tasks, each admitted by the host of its submit or
        poll URL, in one statement: every claimed task, ``held`` set on those that went
        back to the schedule for when their hosts have room. The first call applies
        TASKMAN_HOST_RATE_LIMITS."""
        await self._apply_limits(conn)
        return await store.claim_admitted_tasks(conn, self.worker_id, batch_size,
                                                lease_seconds, **self._timing())

    async def record(self, conn: psycopg.AsyncConnection[Any],
                     outcomes: Iterable[Mapping[str, Any]], results_json: str) -> int:
        """Record what `outcomes` say about their hosts and `results_json` (those of them
        that are polls, serialised), in one statement; failed polls held back because
        their host is open or paused go back to the schedule unrecorded (they do not
        spend their tasks' error budgets). Returns how many results were recorded."""
        return await store.record_polls(
            conn, self.worker_id, results_json, self._reports(outcomes),
            failure_threshold=self.settings.host_failure_threshold, **self._timing())

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
        reports = self._reports(outcomes)
        if not reports:
            return set()
        return await store.record_host_outcomes(
            conn, self.worker_id, reports,
            failure_threshold=self.settings.host_failure_threshold, **self._timing())

    @staticmethod
    def _reports(outcomes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """What `outcomes` tell the host table: every failure, and per host the last
        success (only it says that the failures before it are not consecutive)."""
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
        last_success = {r["host"]: i for i, r in enumerate(reports) if r["result"] == "success"}
        return [r for i, r in enumerate(reports)
                if r["result"] == "failure" or last_success[r["host"]] == i]


def _error(outcome: Mapping[str, Any]) -> str:
    """A failure's short code: ``http_503``, ``connection_error``, ``timeout``."""
    status = outcome.get("http_status")
    return f"http_{status}" if status is not None else str(outcome.get("reason"))
