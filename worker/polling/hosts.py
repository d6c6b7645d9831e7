"""Remote hosts as all workers see them: the gate after each claim and the host side of
each batch of outcomes (circuit breakers, Retry-After pauses, rate limits).

The state lives in ``taskman_private.hosts``, per owner: what one owner's requests meet
(failures, a Retry-After) holds that owner's tasks on the host; the host's own circuit
opens only when it fails for more than one owner (or for the service's own tasks). Each
call here is one statement for a whole batch: the claim and the record of polls include
the host table's side, and a report goes in the transaction of the record it goes with.
Polls and submits both go through it: a claimed task's request is to its submit URL
until the submit worked, then to its poll URL.

Between a claim and the record that opens a circuit, the worker keeps its own count
(``LocalCircuits``): once an owner's requests to a host have failed as many times in a
row as open a circuit, what it claimed for them before and has not sent stays unsent
and goes back to the schedule, spending nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from worker import store
from worker.config import Settings
from worker.domain import ClaimedTask

log = logging.getLogger(__name__)

# Reasons a request never got an answer from its host (poller.py's retry reasons).
_TRANSPORT_ERRORS = frozenset({"connection_error", "timeout"})

HostVerdict = Literal["success", "failure"]
# The owner of the service's own tasks, in circuits' keys.
SERVICE = "service"


def owner_key(host: str, owner: str | None) -> str:
    """The key of `owner`'s own circuit on `host` (taskman_private.owner_host)."""
    return f"{host}#{owner or SERVICE}"


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

    def _reports(self, outcomes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """What `outcomes` tell the host table: every failure and unsent request, and per
        host and owner the last success (only it says that the failures before it are
        not consecutive). A Retry-After counts for at most TASKMAN_HOST_MAX_PAUSE."""
        max_pause = self.settings.host_max_pause_seconds
        reports = []
        for outcome in outcomes:
            host = outcome.get("host")
            verdict = "unsent" if outcome.get("unsent") else host_verdict(outcome)
            if verdict is None or host is None:
                continue
            reports.append({"task_id": outcome.get("task_id"), "host": host,
                            "owner": outcome.get("owner"), "result": verdict,
                            "error": _error(outcome) if verdict == "failure" else None,
                            "retry_after_seconds": _capped(outcome.get("retry_after_seconds"),
                                                           max_pause)})
        last_success = {(r["host"], r["owner"]): i for i, r in enumerate(reports)
                        if r["result"] == "success"}
        return [r for i, r in enumerate(reports)
                if r["result"] != "success" or last_success[r["host"], r["owner"]] == i]


def _capped(seconds: float | None, at_most: float) -> float | None:
    return None if seconds is None else min(seconds, at_most)


def _error(outcome: Mapping[str, Any]) -> str:
    """A failure's short code: ``http_503``, ``connection_error``, ``timeout``."""
    status = outcome.get("http_status")
    return f"http_{status}" if status is not None else str(outcome.get("reason"))


@dataclass
class _Run:
    """One owner's requests to one host since their last answer: failures in a row, the
    last one's time (monotonic), and the outcome that reached the threshold (its place
    in the recorder's order; None below it)."""

    failures: int = 0
    failed_at: float = 0.0
    trip_seq: int | None = None
    # Claims that began before this moment were admitted before the database knew: they
    # stay unsent. +inf until a record that holds the tripping failure has committed.
    settled_at: float = float("inf")


class LocalCircuits:
    """One worker's count of each owner's consecutive failures on each host, for the
    moments between a claim and the record that opens the circuit in the database.

    ``observe`` sees every outcome as it ends; ``recorded`` is told how many outcomes the
    database has taken; ``withheld`` says whether a claimed task must stay unsent. A host
    is withheld for everyone only where the database would open it: two owners (or the
    service) tripped on it.
    """

    def __init__(self, threshold: int, lease_seconds: float) -> None:
        self.threshold = threshold
        self.lease_seconds = lease_seconds
        self._runs: dict[str, dict[str, _Run]] = {}  # host -> owner -> run
        self._seen = 0  # outcomes observed, in the order the recorder takes them

    def observe(self, host: str | None, owner: str | None,
                outcome: Mapping[str, Any]) -> None:
        """Count one finished request (call it as its outcome is queued for recording)."""
        self._seen += 1
        verdict = host_verdict(outcome)
        if host is None or verdict is None:
            return
        owners = self._runs.get(host)
        if verdict == "success":
            if owners is not None:
                owners.pop(owner or SERVICE, None)
                if not owners:
                    del self._runs[host]
            return
        run = self._runs.setdefault(host, {}).setdefault(owner or SERVICE, _Run())
        run.failures += 1
        run.failed_at = time.monotonic()
        if run.failures >= self.threshold and run.trip_seq is None:
            run.trip_seq = self._seen

    def recorded(self, upto: int) -> None:
        """The database has taken the first `upto` outcomes observed: circuits they
        tripped are open there now, and later claims are admitted knowing it. A run
        that no claim still waiting can be held by (its last failure, or the record that
        settled it, older than a lease) is forgotten: the database keeps the count."""
        now = time.monotonic()
        for host, owners in list(self._runs.items()):
            for owner, run in list(owners.items()):
                if run.trip_seq is not None and run.settled_at == float("inf"):
                    if run.trip_seq <= upto:
                        run.settled_at = now
                elif now - min(run.settled_at, run.failed_at) > self.lease_seconds:
                    del owners[owner]
            if not owners:
                del self._runs[host]

    def withheld(self, host: str | None, owner: str | None, claimed_at: float) -> bool:
        """Whether a task of `owner` claimed at `claimed_at` (monotonic) must not be sent
        to `host`: its owner's circuit there tripped after it was admitted, or the
        host's (two owners', or the service's)."""
        owners = self._runs.get(host) if host is not None else None
        if not owners:
            return False
        tripped = {o for o, run in owners.items()
                   if run.trip_seq is not None and claimed_at < run.settled_at}
        return (owner or SERVICE) in tripped or SERVICE in tripped or len(tripped) >= 2
