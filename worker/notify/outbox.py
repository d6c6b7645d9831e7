"""The outbox dispatcher: claims due notifications, delivers them, records every attempt.

Rows are written by the database in the transaction that ends a task (Slack alerts
for failures, callbacks for every task with a ``callback_url``). The dispatcher claims
a batch with a lease (``claim_outbox``), delivers the Slack alerts of the batch as one
message (a digest when there are several) and the callbacks concurrently, then
records the outcomes in one statement (``record_outbox_results``), which schedules
retries with backoff, gives up after ``TASKMAN_OUTBOX_MAX_ATTEMPTS`` and writes
task_events. Without Slack settings, alerts are given up at once with reason
``slack_not_configured``, so they neither pile up nor vanish silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aiohttp
import psycopg

from worker import store
from worker.config import Settings
from worker.notify.completion_callbacks import CallbackSender
from worker.notify.delivery import Delivery
from worker.notify.slack import SlackAlerter, alert_text

log = logging.getLogger(__name__)

MAX_LEASE_SECONDS = 3_600  # what claim_outbox accepts


@dataclass(frozen=True)
class OutboxRow:
    """One claimed notification: ``payload`` is the task's public JSON when it ended, or
    None if it could not be read (``problem`` says why)."""

    outbox_id: int
    task_id: UUID
    channel: str
    payload: dict[str, Any] | None
    attempts: int
    problem: str | None = None

    @classmethod
    def claimed(cls, outbox_id: int, task_id: UUID, channel: str, payload: str,
                attempts: int) -> OutboxRow:
        """A row as ``outbox_claim`` returns it, its payload (JSON text) parsed here."""
        try:
            return cls(outbox_id, task_id, channel, json.loads(payload), attempts)
        except (ValueError, RecursionError) as exc:
            problem = f"the task's JSON could not be read: {type(exc).__name__}: {exc}"
            return cls(outbox_id, task_id, channel, None, attempts, problem[:500])


@dataclass(frozen=True)
class DispatchSummary:
    """How one round went: rows claimed, and how many of them ended each way."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    given_up: int = 0


class OutboxDispatcher:
    """Delivers the outbox for one worker. Safe to run in any number of workers at once.

    ``http`` sends the callbacks (build it with ``callbacks.callback_client``); the
    caller owns it.
    Delivery is at least once: receivers can deduplicate on ``X-Taskman-Delivery``.
    """

    def __init__(self, settings: Settings, worker_id: str, http: aiohttp.ClientSession) -> None:
        self.worker_id = worker_id
        self._settings = settings
        self._slack = SlackAlerter.from_settings(settings)
        secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
        self._callbacks = CallbackSender(http, secret)
        self._limit = asyncio.Semaphore(settings.concurrency)
        # The lease must outlast a round: the batch's callbacks go out in waves of
        # `concurrency`, each wave taking up to the timeout; one wave more for margin.
        waves = math.ceil(settings.outbox_batch_size / settings.concurrency) + 1
        self._lease_seconds = min(
            MAX_LEASE_SECONDS,
            max(settings.lease_seconds, math.ceil(settings.callback_timeout_seconds * waves)),
        )

    async def run_once(self, conn: psycopg.AsyncConnection[Any]) -> DispatchSummary:
        """Claim one batch of due rows, deliver it and record the outcomes.

        The worker runs this as a periodic job, on a connection from its pool; a
        summary with ``claimed == outbox_batch_size`` means more may be due at once.
        """
        rows = await self._claim(conn)
        if not rows:
            return DispatchSummary()
        unreadable = [r for r in rows if r.payload is None]
        alerts = [r for r in rows if r.channel == "slack" and r.payload is not None]
        callbacks = [r for r in rows if r.channel == "callback" and r.payload is not None]
        batches = await asyncio.gather(
            self._deliver_alerts(alerts), *(self._deliver_callback(r) for r in callbacks)
        )
        results = [result for batch in batches for result in batch]
        results += [self._result(r, Delivery("failed", reason="unreadable_payload",
                                             error=r.problem)) for r in unreadable]
        outcomes = await self._record(conn, results)
        return DispatchSummary(
            claimed=len(rows),
            delivered=outcomes.count("delivered"),
            failed=outcomes.count("failed"),
            given_up=outcomes.count("given_up"),
        )

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> list[OutboxRow]:
        rows = await store.claim_outbox(conn, self.worker_id, self._settings.outbox_batch_size,
                                        self._lease_seconds)
        return [OutboxRow.claimed(**row) for row in rows]

    async def _record(
        self, conn: psycopg.AsyncConnection[Any], results: Sequence[dict[str, Any]]
    ) -> list[str]:
        return await store.record_outbox_results(
            conn, results,
            max_attempts=self._settings.outbox_max_attempts,
            base_delay_seconds=self._settings.outbox_retry_base_seconds,
            max_delay_seconds=self._settings.outbox_retry_max_seconds,
        )

    async def _deliver_alerts(self, rows: Sequence[OutboxRow]) -> list[dict[str, Any]]:
        """Every alert of the batch in one Slack message; its fate is theirs."""
        if not rows:
            return []
        if self._slack is None:
            delivery = Delivery("given_up", reason="slack_not_configured")
        else:
            try:
                text = alert_text([r.payload for r in rows if r.payload is not None])
                delivery = await asyncio.to_thread(self._slack.send, text)
            except Exception as exc:
                delivery = _unexpected("alerts", rows, exc)
        digest_size = len(rows) if len(rows) > 1 else None
        return [self._result(r, delivery, digest_size) for r in rows]

    async def _deliver_callback(self, row: OutboxRow) -> list[dict[str, Any]]:
        assert row.payload is not None  # run_once records unreadable rows apart
        async with self._limit:
            try:
                delivery = await self._callbacks.deliver(row.outbox_id, row.payload)
            except Exception as exc:  # one row's surprise must not sink the batch's records
                delivery = _unexpected("callback", [row], exc)
        return [self._result(row, delivery)]

    def _result(
        self, row: OutboxRow, delivery: Delivery, digest_size: int | None = None
    ) -> dict[str, Any]:
        """One element of record_outbox_results' ``results``."""
        return {
            "outbox_id": row.outbox_id,
            "worker_id": self.worker_id,
            "outcome": delivery.outcome,
            "reason": delivery.reason,
            "http_status": delivery.http_status,
            "latency_ms": delivery.latency_ms,
            "retry_after_seconds": delivery.retry_after_seconds,
            "digest_size": digest_size,
            "error": delivery.error,
        }


def _unexpected(what: str, rows: Sequence[OutboxRow], exc: Exception) -> Delivery:
    log.exception("delivering %s for outbox rows %s failed unexpectedly", what,
                  [r.outbox_id for r in rows])
    return Delivery("failed", reason="unexpected_error", error=f"{type(exc).__name__}: {exc}")
