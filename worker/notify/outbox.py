"""The outbox: claims due notifications, delivers them, records every attempt.

Rows are written by the database in the transaction that ends a task (Slack alerts
for failures, callbacks for every task with a ``callback_url``). Two ways deliver them:

- ``OutboxDispatcher.run_once`` claims one batch with a lease (``claim_outbox``),
  delivers its Slack alerts as one message (a digest when there are several) and its
  callbacks concurrently, then records the outcomes in one statement
  (``record_outbox_results``), which schedules retries with backoff, gives up after
  ``TASKMAN_OUTBOX_MAX_ATTEMPTS`` and writes task_events. The worker runs it once a
  second for Slack alerts only: the digest window.
- ``CallbackStream`` delivers callbacks as they come: the enqueue trigger's NOTIFY
  (channel ``taskman_outbox``) wakes it, it keeps claiming while rows are due and it
  has room, each callback goes out as soon as it is claimed (within its host's
  limit), and outcomes are recorded in batches as they finish. Without LISTEN it
  looks every ``TASKMAN_CHANGE_CHECK_INTERVAL``. Receivers' hosts with an open circuit
  or a Retry-After pause get no callbacks meanwhile (``callback_hosts``).

Without Slack settings, alerts are given up at once with reason
``slack_not_configured``, so they neither pile up nor vanish silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import aiohttp
import psycopg
from psycopg_pool import PoolTimeout

from worker import db, store
from worker.config import Settings
from worker.domain import ServiceContext
from worker.notify.callback_hosts import CallbackHosts, callback_host, callback_owner
from worker.notify.completion_callbacks import CallbackSender
from worker.notify.delivery import Delivery
from worker.notify.refusals import RefusedCallbacks
from worker.notify.signing import CallbackSigner
from worker.notify.slack import SlackAlerter, alert_text, host_alert_text, is_host_alert

log = logging.getLogger(__name__)

MAX_LEASE_SECONDS = 3_600  # what claim_outbox accepts
# The enqueue trigger's NOTIFY channel (a callback was enqueued).
OUTBOX_CHANNEL = "taskman_outbox"
# While listening, look anyway this often: retries falling due, a task's next callback
# freed by another worker's delivery.
IDLE_CHECK_SECONDS = 1.0
# Outcomes wait at most this long for others to share their record_outbox_results call,
# and only while other callbacks are still in flight.
RECORD_DELAY_SECONDS = 0.005
RECORD_BATCH = 500
_DB_ERRORS = (psycopg.OperationalError, PoolTimeout)


@dataclass(frozen=True)
class OutboxRow:
    """One claimed notification: ``payload`` is the task's public JSON when it ended, or
    None if it could not be read (``problem`` says why)."""

    outbox_id: int
    task_id: UUID | None  # None for a host alert
    channel: str
    payload: dict[str, Any] | None
    attempts: int
    problem: str | None = None
    headers: dict[str, str] | None = None  # a callback's callback_headers (service-only)

    @classmethod
    def claimed(cls, outbox_id: int, task_id: UUID | None, channel: str, payload: str,
                attempts: int, headers: dict[str, str] | None = None) -> OutboxRow:
        """A row as ``outbox_claim`` returns it, its payload (JSON text) parsed here."""
        try:
            return cls(outbox_id, task_id, channel, json.loads(payload), attempts,
                       headers=headers)
        except (ValueError, RecursionError) as exc:
            problem = f"the task's JSON could not be read: {type(exc).__name__}: {exc}"
            return cls(outbox_id, task_id, channel, None, attempts, problem[:500], headers)


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

    def __init__(self, settings: Settings, worker_id: str, http: aiohttp.ClientSession,
                 refusals: RefusedCallbacks | None = None,
                 signer: CallbackSigner | None = None) -> None:
        self.worker_id = worker_id
        self._settings = settings
        self._slack = SlackAlerter.from_settings(settings)
        secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
        self._callbacks = CallbackSender(http, secret, refusals, signer=signer)
        self._limit = asyncio.Semaphore(settings.concurrency)
        # The lease must outlast a round: the batch's callbacks go out in waves of
        # `concurrency`, each wave taking up to the timeout; one wave more for margin.
        waves = math.ceil(settings.outbox_batch_size / settings.concurrency) + 1
        self._lease_seconds = min(
            MAX_LEASE_SECONDS,
            max(settings.lease_seconds, math.ceil(settings.callback_timeout_seconds * waves)),
        )

    async def run_once(self, conn: psycopg.AsyncConnection[Any],
                       channel: str | None = None) -> DispatchSummary:
        """Claim one batch of due rows (of ``channel`` only, if given), deliver it and
        record the outcomes.

        The worker runs this for Slack alerts as a periodic job, on a connection from
        its pool; a summary with ``claimed == outbox_batch_size`` means more may be due
        at once.
        """
        rows = await self._claim(conn, channel)
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

    async def _claim(self, conn: psycopg.AsyncConnection[Any],
                     channel: str | None) -> list[OutboxRow]:
        rows = await store.claim_outbox(conn, self.worker_id, self._settings.outbox_batch_size,
                                        self._lease_seconds, channel=channel)
        return [OutboxRow.claimed(**row) for row in rows]

    async def _record(
        self, conn: psycopg.AsyncConnection[Any], results: Sequence[dict[str, Any]]
    ) -> list[str]:
        return await _record(self._settings, conn, results)

    async def _deliver_alerts(self, rows: Sequence[OutboxRow]) -> list[dict[str, Any]]:
        """Every task alert of the batch in one Slack message, whose fate is theirs; a
        host's circuit opening or closing in a message of its own."""
        hosts = [r for r in rows if is_host_alert(r.payload)]
        tasks = [r for r in rows if not is_host_alert(r.payload)]
        sent = [await self._deliver_task_alerts(tasks)]
        sent += [await self._deliver_host_alert(r) for r in hosts]
        return [result for results in sent for result in results]

    async def _deliver_host_alert(self, row: OutboxRow) -> list[dict[str, Any]]:
        assert row.payload is not None  # run_once records unreadable rows apart
        if self._slack is None:
            return [self._result(row, Delivery("given_up", reason="slack_not_configured"))]
        try:
            delivery = await asyncio.to_thread(self._slack.send, host_alert_text(row.payload))
        except Exception as exc:
            delivery = _unexpected("host alert", [row], exc)
        return [self._result(row, delivery)]

    async def _deliver_task_alerts(self, rows: Sequence[OutboxRow]) -> list[dict[str, Any]]:
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
                delivery = await self._callbacks.deliver(row.outbox_id, row.payload,
                                                        row.headers)
            except Exception as exc:  # one row's surprise must not sink the batch's records
                delivery = _unexpected("callback", [row], exc)
        return [self._result(row, delivery)]

    def _result(
        self, row: OutboxRow, delivery: Delivery, digest_size: int | None = None
    ) -> dict[str, Any]:
        return _result(self.worker_id, row, delivery, digest_size)


def _result(worker_id: str, row: OutboxRow, delivery: Delivery,
            digest_size: int | None = None) -> dict[str, Any]:
    """One element of record_outbox_results' ``results``."""
    return {
        "outbox_id": row.outbox_id,
        "worker_id": worker_id,
        "outcome": delivery.outcome,
        "reason": delivery.reason,
        "http_status": delivery.http_status,
        "latency_ms": delivery.latency_ms,
        "retry_after_seconds": delivery.retry_after_seconds,
        "digest_size": digest_size,
        "error": delivery.error,
    }


async def _record(settings: Settings, conn: psycopg.AsyncConnection[Any],
                  results: Sequence[dict[str, Any]]) -> list[str]:
    return await store.record_outbox_results(
        conn, results,
        max_attempts=settings.outbox_max_attempts,
        base_delay_seconds=settings.outbox_retry_base_seconds,
        max_delay_seconds=settings.outbox_retry_max_seconds,
    )


def _unexpected(what: str, rows: Sequence[OutboxRow], exc: Exception) -> Delivery:
    log.exception("delivering %s for outbox rows %s failed unexpectedly", what,
                  [r.outbox_id for r in rows])
    return Delivery("failed", reason="unexpected_error", error=f"{type(exc).__name__}: {exc}")


@dataclass
class _Host:
    """A callback host's rows held by this worker: ready to go (oldest first), and how
    many are being sent."""

    ready: deque[tuple[OutboxRow, float]] = field(default_factory=deque)
    sending: int = 0

    @property
    def held(self) -> int:
        return len(self.ready) + self.sending


@dataclass
class _Room:
    """What the stream holds: rows claimed and not yet finished, by host, and the hosts
    that have a row ready and room to send it, in turn order."""

    hosts: dict[str, _Host] = field(default_factory=dict)
    held: int = 0
    runnable: dict[str, None] = field(default_factory=dict)


class CallbackStream:
    """Delivers completion callbacks as they are enqueued, for one worker (a worker
    ``Service``). Safe to run in any number of workers at once.

    ``TASKMAN_CONCURRENCY`` senders send the callbacks, at most
    ``TASKMAN_PER_HOST_CONCURRENCY`` at once to one host (the URL's authority); hosts
    with rows ready take turns. Beside those in flight the stream holds up to one
    claim's worth ready, so that sending does not wait for a claim's round trip. A host
    holding twice its limit (as many in flight, as many ready) is skipped by the next
    claims, so a slow receiver keeps a few rows waiting, not the whole worker. Rows are
    claimed in due order, each task's in order; each goes out as soon as a sender and
    its host have room, and its outcome joins the next ``record_outbox_results`` batch.
    Hosts with an open circuit or a pause are skipped (``CallbackHosts``), and the
    outcomes count toward their circuits. At least once: a row whose lease ran out
    while it waited is left to whoever claims it next.
    """

    name = "deliver_callbacks"
    channel = OUTBOX_CHANNEL
    pool_connections = 2  # one claiming, one recording

    def __init__(self, settings: Settings, worker_id: str, http: aiohttp.ClientSession,
                 refusals: RefusedCallbacks | None = None,
                 signer: CallbackSigner | None = None) -> None:
        self.worker_id = worker_id
        self._settings = settings
        secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
        self._callbacks = CallbackSender(http, secret, refusals, signer=signer)
        self._capacity = settings.concurrency
        self._per_host = settings.per_host_concurrency
        # Rows held ready beyond those in flight: one claim's worth.
        self._ahead = min(settings.outbox_batch_size, self._capacity)
        # Claim again once this much room is free (or when nothing is held), so that a
        # busy stream claims in batches rather than a row at a time.
        self._refill = max(1, self._ahead // 4)
        # A host is skipped by claims once it holds this many rows.
        self._host_full = 2 * self._per_host
        # A row may wait for its host behind one claim's worth of rows and a full host's,
        # sent per_host at a time, each taking up to the timeout; then for a sender,
        # behind at most the rows held ready; one round more for margin.
        waves = math.ceil((self._ahead + self._host_full) / self._per_host) + 2
        self._lease_seconds = min(
            MAX_LEASE_SECONDS,
            max(settings.lease_seconds, math.ceil(settings.callback_timeout_seconds * waves)),
        )
        self._room = _Room()
        self._idle: deque[asyncio.Future[None]] = deque()  # senders waiting for a row
        self._hosts = CallbackHosts(settings, worker_id)
        self._results: list[tuple[OutboxRow, Delivery]] = []
        self._result_added = asyncio.Event()
        self._draining = False

    async def subscribe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await store.listen_outbox(conn)

    async def run(self, context: ServiceContext) -> None:
        """Deliver until ``context.stopping``; then let the callbacks in flight finish
        within ``TASKMAN_SHUTDOWN_GRACE``, record them, and give back the rest (sends cut
        off, rows still waiting), which other workers then deliver at once."""
        recorder = asyncio.create_task(self._record_loop(context), name="record_callbacks")
        senders = [asyncio.create_task(self._sender(context), name="send_callbacks")
                   for _ in range(self._capacity)]
        try:
            await self._claim_loop(context)
            self._wake_senders(len(self._idle))  # idle ones end; busy ones after their send
            _, unfinished = await asyncio.wait(
                senders, timeout=self._settings.shutdown_grace_seconds)
            for sender in unfinished:
                sender.cancel()  # its send is unrecorded: given back below
            await asyncio.gather(*senders, return_exceptions=True)
            self._draining = True
            self._result_added.set()
            await recorder
            await self._release(context)
        finally:
            recorder.cancel()
            for sender in senders:
                sender.cancel()

    # Claiming -------------------------------------------------------------------------

    def _free(self) -> int:
        """Rows the stream may claim now."""
        sendable = sum(min(h.held, self._host_full) for h in self._room.hosts.values())
        return min(self._capacity + self._ahead - sendable, 4 * self._capacity - self._room.held)

    async def _claim_loop(self, context: ServiceContext) -> None:
        failures = 0
        while not context.stopping.is_set():
            free = self._free()
            if self._room.held and free < self._refill:
                context.wake.clear()
                await context.wake.wait()  # a delivery ended, a record, or shutdown
                continue
            # Cleared before claiming: a NOTIFY arriving during the claim wakes the wait below.
            context.wake.clear()
            wanted = min(self._settings.outbox_batch_size, free)
            try:
                claimed = await self._claim(context, wanted)
                failures = 0
            except _DB_ERRORS as exc:
                failures += 1
                wait = db.retry_delay(failures)
                log.warning("claiming callbacks failed (%s); retrying in %.1fs", exc, wait)
                await _wait(context.wake, wait)
                continue
            except psycopg.Error as exc:
                # Refused (a read-only database, a privilege revoked): as the task claim.
                failures += 1
                wait = db.retry_delay(failures)
                log.error("claiming callbacks refused by the database (%s: %s); retrying in "
                          "%.1fs", exc.sqlstate, exc.diag.message_primary, wait)
                await _wait(context.stopping, wait)
                continue
            if claimed < wanted:
                idle = (IDLE_CHECK_SECONDS if context.listening()
                        else min(IDLE_CHECK_SECONDS, context.change_check_interval))
                await _wait(context.wake, idle)

    async def _claim(self, context: ServiceContext, wanted: int) -> int:
        busy = [key for key, host in self._room.hosts.items() if host.held >= self._host_full]
        lease_ends = time.monotonic() + self._lease_seconds  # no later than the database's
        async with context.connection() as conn:
            skip = [*busy, *await self._hosts.skip_hosts(conn)]
            rows = [OutboxRow.claimed(**row) for row in await store.claim_outbox(
                conn, self.worker_id, wanted, self._lease_seconds, channel="callback",
                skip_hosts=skip)]
            held = await self._hosts.hold(
                conn, [(r.outbox_id, _url(r), callback_owner(r.payload)) for r in rows])
        sendable = [r for r in rows if r.outbox_id not in held]
        for row in sendable:
            self._hold(row, lease_ends)
        self._wake_senders(len(sendable))
        return len(rows)

    def _hold(self, row: OutboxRow, lease_ends: float) -> None:
        key = callback_host(_url(row))
        host = self._room.hosts.get(key)
        if host is None:
            host = self._room.hosts[key] = _Host()
        host.ready.append((row, lease_ends))
        self._room.held += 1
        if host.sending < self._per_host:
            self._room.runnable[key] = None

    # Delivering -----------------------------------------------------------------------

    def _wake_senders(self, count: int) -> None:
        """Wake up to `count` idle senders."""
        while count and self._idle:
            waiting = self._idle.popleft()
            if not waiting.done():
                waiting.set_result(None)
                count -= 1

    def _next(self) -> tuple[str, _Host, OutboxRow, float] | None:
        """The next row to send: the oldest of the host whose turn it is."""
        runnable = self._room.runnable
        if not runnable:
            return None
        key = next(iter(runnable))
        del runnable[key]
        host = self._room.hosts[key]
        row, lease_ends = host.ready.popleft()
        host.sending += 1
        if host.ready and host.sending < self._per_host:
            runnable[key] = None  # to the back: the other hosts' turn first
        return key, host, row, lease_ends

    async def _sender(self, context: ServiceContext) -> None:
        """Send rows as they are ready until ``context.stopping``."""
        while not context.stopping.is_set():
            picked = self._next()
            if picked is None:
                waiting = asyncio.get_running_loop().create_future()
                self._idle.append(waiting)
                await waiting
                continue
            key, host, row, lease_ends = picked
            delivery: Delivery | None = None
            try:
                delivery = await self._attempt(row, lease_ends)
            finally:
                host.sending -= 1
                self._room.held -= 1
                if host.ready:
                    self._room.runnable[key] = None
                elif not host.sending:
                    del self._room.hosts[key]
                if self._free() >= self._refill or not self._room.held:
                    context.wake.set()
            if delivery is not None:
                self._results.append((row, delivery))
                self._result_added.set()

    async def _attempt(self, row: OutboxRow, lease_ends: float) -> Delivery | None:
        """Send `row`; None leaves it unrecorded: past its lease, it may be someone
        else's now."""
        if time.monotonic() >= lease_ends:
            log.warning("callback %s waited for its host past its lease; not sent",
                        row.outbox_id, extra={"task_id": str(row.task_id)})
            return None
        if row.payload is None:
            return Delivery("failed", reason="unreadable_payload", error=row.problem)
        try:
            return await self._callbacks.deliver(row.outbox_id, row.payload, row.headers)
        except Exception as exc:  # one row's surprise must not stop the others
            return _unexpected("callback", [row], exc)

    # Recording ------------------------------------------------------------------------

    async def _record_loop(self, context: ServiceContext) -> None:
        """Write finished deliveries in batches until drained at shutdown."""
        while True:
            await self._result_added.wait()
            if not self._results and self._draining:
                return
            if self._room.held and len(self._results) < RECORD_BATCH and not self._draining:
                await asyncio.sleep(RECORD_DELAY_SECONDS)  # let deliveries in flight join
            batch = self._results[:RECORD_BATCH]
            del self._results[:RECORD_BATCH]
            if not self._results:
                self._result_added.clear()
            if batch:
                await self._record(context, batch)
                context.wake.set()  # a task's next callback may be claimable now

    async def _record(self, context: ServiceContext,
                      batch: list[tuple[OutboxRow, Delivery]]) -> None:
        """Record `batch` (first what it says about its hosts: failed probes are given back
        instead), retrying through database outages (at shutdown, for a while)."""
        failures = 0
        results: list[dict[str, Any]] | None = None
        while True:
            try:
                async with context.connection() as conn:
                    if results is None:
                        given_back = await self._hosts.report(
                            conn, [(r.outbox_id, _url(r), callback_owner(r.payload), d)
                                   for r, d in batch])
                        results = [_result(self.worker_id, r, d) for r, d in batch
                                   if r.outbox_id not in given_back]
                    await _record(self._settings, conn, results)
                return
            except _DB_ERRORS as exc:
                failures += 1
                if self._draining and failures > 3:
                    log.error("could not record %d callbacks (%s); they are sent again when "
                              "their leases end", len(batch), exc)
                    return
                wait = db.retry_delay(failures)
                log.warning("recording %d callbacks failed (%s); retrying in %.1fs",
                            len(batch), exc, wait)
                await asyncio.sleep(wait)
            except psycopg.Error:
                log.exception("recording %d callbacks failed; they are sent again when their "
                              "leases end", len(batch))
                return


    async def _release(self, context: ServiceContext) -> None:
        """Give back the callbacks claimed and not recorded (at shutdown, once recorded)."""
        try:
            async with asyncio.timeout(SHUTDOWN_DB_SECONDS), context.connection() as conn:
                released = await store.release_outbox(conn, self.worker_id, channel="callback")
        except (*_DB_ERRORS, psycopg.Error, TimeoutError) as exc:
            log.error("could not give back unsent callbacks (%r); they are sent again when "
                      "their leases end", exc)
            return
        if released:
            log.info("gave back %d unsent callbacks", released, extra={"released": released})


# At shutdown, how long giving back unsent callbacks may take.
SHUTDOWN_DB_SECONDS = 5.0


def _url(row: OutboxRow) -> str | None:
    url = (row.payload or {}).get("callback_url")
    return url if isinstance(url, str) else None


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set, or `seconds` have passed."""
    with suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
