"""The worker service: claim due tasks, poll them concurrently, record outcomes in batches.

One asyncio loop runs a few long-lived coroutines beside the polls themselves:

- the claimer claims due tasks for the free poll slots and up to half as many more, held
  ready so that a freed slot does not wait for a claim's round trip (and, in the same
  transaction, lets through those their hosts allow now: worker.polling.hosts), then
  sleeps until
  a NOTIFY on ``taskman`` says a task is new (or retried), or the next one falls due;
  while it cannot LISTEN (behind a transaction pooler with no separate listen URL, or
  while the listen connection is down) it checks the due index every
  ``change_check_interval`` seconds instead;
- each claimed task is polled in its own coroutine, within the global limit
  (``concurrency``) and its host's limit (``per_host_concurrency``);
- the recorder writes finished polls with one ``record_poll_results`` call a batch,
  after telling the host table what they say about their hosts;
- periodic jobs: the overdue sweep, and whatever else is given (Slack alerts);
- services: long-running work beside polling (callback delivery), woken by a NOTIFY on
  a channel of their own, which the listener subscribes to beside ``taskman``.

Database errors never end the loop: each coroutine retries with backoff, and the pool
replaces broken connections, so a database restart is a pause, not a crash. A database
that refuses the claim (read-only, a privilege revoked) pauses polling the same way.
At shutdown each coroutine ends when it sees ``_stopping``, not only when cancelled: on
Python 3.11 a cancellation that lands as the pool hands over a connection is lost
(``asyncio.wait_for`` returns the connection instead), and the round goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker import db, store
from worker.config import Settings
from worker.domain import ClaimedTask, PollOutcome, ServiceContext
from worker.polling.hosts import HostGate, LocalCircuits
from worker.polling.metrics import WorkerMetrics
from worker.polling.poller import Poller, make_session
from worker.polling.submitter import Submitter
from worker.remote.host_keys import host_key

log = logging.getLogger(__name__)

# With nothing due, look again at least this often (a safety net under NOTIFY).
MAX_IDLE_SECONDS = 5.0
# Outcomes wait at most this long for others to share their record_poll_results call,
# and only while other polls are still running.
RECORD_DELAY_SECONDS = 0.005
RECORD_BATCH = 1_000
# The largest result a task holds (record_poll_results refuses a batch with a larger one).
MAX_RESULT_BYTES = 1_048_576
SWEEP_INTERVAL_SECONDS = 5.0
# Shutdown: how long the last records and the release of leases may take.
SHUTDOWN_DB_SECONDS = 5.0
# Errors of a database that is gone for a while (a restart, a failover, a full pool).
_DB_ERRORS = (psycopg.OperationalError, PoolTimeout)


@dataclass(frozen=True)
class PeriodicJob:
    """Work the worker runs every `interval_seconds` besides polling.

    `run_once` does one round (e.g. deliver the due outbox rows) on a connection from
    the worker's pool (autocommit); an exception is logged and the job runs again at
    its next interval.
    """

    name: str
    interval_seconds: float
    run_once: Callable[[psycopg.AsyncConnection], Awaitable[object]]


class Service(Protocol):
    """Work that runs for the worker's whole life beside polling (callback delivery).

    ``run`` works until its context's ``stopping`` is set, then finishes or leaves what
    is in flight and returns. ``subscribe`` LISTENs on ``channel`` on the worker's
    listen connection; a NOTIFY there sets the context's ``wake``. It holds at most
    ``pool_connections`` connections of the worker's pool at once.
    """

    name: str
    channel: str
    pool_connections: int

    async def subscribe(self, conn: psycopg.AsyncConnection[Any]) -> None: ...

    async def run(self, context: ServiceContext) -> None: ...


def new_worker_id() -> str:
    """``hostname-pid-random``: unique per process, and says where a lease came from."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """One worker process's loop. Any number of them may share a database."""

    def __init__(
        self,
        settings: Settings,
        conninfo: str,
        *,
        jobs: Sequence[PeriodicJob] = (),
        services: Sequence[Service] = (),
        worker_id: str | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.conninfo = conninfo
        self.connections = db.Connections.resolve(
            conninfo, settings.database_pool_mode, settings.listen_database_url)
        self.worker_id = worker_id or new_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.jobs = [PeriodicJob("expire_overdue_tasks", SWEEP_INTERVAL_SECONDS,
                                 self.expire_overdue_tasks), *jobs]
        self.services = list(services)
        self._stopping = asyncio.Event()
        self._contexts = {
            service.name: ServiceContext(
                connection=self._connection, wake=asyncio.Event(), stopping=self._stopping,
                listening=lambda: self._listening,
                change_check_interval=settings.change_check_interval)
            for service in self.services}
        # The pool, HTTP session and poller exist while run() runs, inside its event loop.
        self._pool: AsyncConnectionPool
        self._http: aiohttp.ClientSession
        self._poller: Poller
        self._submitter: Submitter
        self._hosts = _HostLimits(settings.per_host_concurrency)
        self._gate = HostGate(settings, self.worker_id)
        self._circuits = LocalCircuits(settings.host_failure_threshold, settings.lease_seconds)
        self._recorded = 0  # outcomes the recorder has taken, for self._circuits
        self._polls: set[asyncio.Task[None]] = set()  # in flight, for shutdown
        self._polling = 0  # polls not yet finished (slots in use)
        # Claimed tasks waiting for a slot, with when their leases end (monotonic): at most
        # half the slots (or half a claim), enough that polls do not wait for a claim's
        # round trip, few enough that claimed tasks do not double the worker's memory.
        self._ready: deque[tuple[ClaimedTask, float]] = deque()
        self._ahead = max(1, min(settings.batch_size, settings.concurrency) // 2)
        # With tasks ready, claim again once this much room is free: in batches, not a
        # task at a time.
        self._refill = max(1, self._ahead // 4)
        self._slot_freed = asyncio.Event()  # set when _claim_room becomes non-zero
        self._wake = asyncio.Event()
        self._listening = False  # a LISTEN connection is up: NOTIFY wakes the claimer
        self._claimer_wakes_at = 0.0  # monotonic; 0 while the claimer is not sleeping
        self._outcomes: list[PollOutcome] = []
        self._outcome_added = asyncio.Event()
        self._draining = False
        self._read_only = db.ReadOnlyRenewal()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then shut down gracefully.

        Shutdown: stop claiming, give in-flight polls up to ``shutdown_grace_seconds``,
        record what finished, and release the leases of what did not.
        """
        log.info("worker %s starting", self.worker_id,
                 extra={"worker_id": self.worker_id, "concurrency": self.settings.concurrency,
                        "pool_mode": self.connections.pool_mode})
        if self.connections.listen_conninfo is None:
            log.info("DATABASE_URL is a transaction pooler, where LISTEN does not work: "
                     "checking for new tasks every %.2gs. For pickup within milliseconds, "
                     "set TASKMAN_LISTEN_DATABASE_URL to a direct or session pooler URL.",
                     self.settings.change_check_interval)
        self._pool = AsyncConnectionPool(
            # One connection each for claiming, recording and every job, and what the
            # services hold.
            self.conninfo, min_size=2,
            max_size=2 + len(self.jobs) + sum(s.pool_connections for s in self.services),
            open=False,
            timeout=SHUTDOWN_DB_SECONDS,
            kwargs={"autocommit": True, "application_name": "taskman-worker",
                    **self.connections.connection_kwargs},
        )
        self._http = make_session(self.settings)
        self._poller = Poller(self._http, self.settings, self.worker_id)
        self._submitter = Submitter(self._http, self.settings, self.worker_id)
        await self._pool.open(wait=False)
        background = [asyncio.create_task(self._claim_loop(), name="claim")]
        if self.connections.listen_conninfo is not None:
            background.append(asyncio.create_task(
                self._listen_loop(self.connections.listen_conninfo), name="listen"))
        background += [asyncio.create_task(self._job_loop(job), name=job.name)
                       for job in self.jobs]
        services = [asyncio.create_task(service.run(self._contexts[service.name]),
                                        name=service.name) for service in self.services]
        recorder = asyncio.create_task(self._record_loop(), name="record")
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, recorder, *background, *services],
                                         return_when=asyncio.FIRST_COMPLETED)
            log.info("worker %s stopping", self.worker_id)
            services_stop_by = time.monotonic() + self.settings.shutdown_grace_seconds
            self._stopping.set()
            self._wake.set()
            self._slot_freed.set()
            for context in self._contexts.values():
                context.wake.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._finish_polls(self.settings.shutdown_grace_seconds)
            self._draining = True
            self._outcome_added.set()
            try:
                await asyncio.wait_for(recorder, SHUTDOWN_DB_SECONDS)
            except TimeoutError:
                log.error("could not record the last outcomes; their leases will expire")
            await self._release_leases()
            await self._stop_services(services, services_stop_by)
            for ended in done - {stopping}:
                ended.result()  # a loop that ended by itself is a bug: raise it
        finally:
            stopping.cancel()
            recorder.cancel()
            await self._http.close()
            await self._pool.close(SHUTDOWN_DB_SECONDS)
        log.info("worker %s stopped", self.worker_id)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the pool. After a write refused as read-only the pool's
        connections are replaced (db.ReadOnlyRenewal), so that the worker sees writes
        allowed again as soon as they are."""
        async with self._pool.connection() as conn:
            try:
                yield conn
            except psycopg.errors.ReadOnlySqlTransaction:
                await conn.close()
                if self._read_only.due():
                    await self._pool.drain()
                raise

    async def _stop_services(self, services: list[asyncio.Task[None]], grace_ends: float) -> None:
        """Give the services until `grace_ends`, plus time to record, then cancel them."""
        if not services:
            return
        timeout = max(0.0, grace_ends - time.monotonic()) + SHUTDOWN_DB_SECONDS
        _, unfinished = await asyncio.wait(services, timeout=timeout)
        for task in unfinished:
            log.error("%s did not stop in time; its leases will expire", task.get_name())
            task.cancel()
        await asyncio.gather(*services, return_exceptions=True)

    async def expire_overdue_tasks(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Fail every live task past its deadline; returns how many."""
        expired = await store.expire_overdue_tasks(conn)
        if expired:
            log.info("expired %d overdue tasks", expired, extra={"expired": expired})
        return expired

    # Claiming -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            if not (free := self._claim_room()):
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            # Cleared before claiming: a NOTIFY arriving during the claim wakes the wait below.
            self._wake.clear()
            wanted = min(self.settings.batch_size, free)
            try:
                claimed = await self._claim(wanted)
                wait = 0.0 if len(claimed) == wanted else await self._seconds_until_due()
                failures = 0
            except _DB_ERRORS as exc:
                failures += 1
                wait = await self._after_db_error("claiming", exc, failures)
            except psycopg.Error as exc:
                # Refused, not lost: e.g. a database gone read-only (a full disk), a
                # privilege revoked. Polling waits; notifications and the edge go on.
                # Not woken early: a new task's NOTIFY would only be refused again.
                failures += 1
                wait = db.retry_delay(failures)
                log.error("claiming refused by the database (%s: %s); retrying in %.1fs",
                          exc.sqlstate, exc.diag.message_primary, wait)
                await self._pause(wait)
                continue
            if wait > 0:
                await self._sleep(wait)

    def _claim_room(self) -> int:
        """How many tasks to claim now: the free slots and room ahead, once there is
        enough of it (0: wait for polls to finish)."""
        free = self.settings.concurrency + self._ahead - self._polling - len(self._ready)
        return 0 if free <= 0 or (self._ready and free < self._refill) else free

    async def _sleep(self, wait: float) -> None:
        """Sleep `wait` seconds, or less when woken (a NOTIFY, an outcome recorded).

        While not listening, look at the due index every ``change_check_interval``
        seconds meanwhile, and end the sleep when a task is due.
        """
        self._claimer_wakes_at = wakes_at = time.monotonic() + wait
        try:
            while (left := wakes_at - time.monotonic()) > 0:
                step = left if self._listening else min(left, self.settings.change_check_interval)
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), step)
                    return
                if step < left and not self._listening and await self._task_due():
                    return
        finally:
            self._claimer_wakes_at = 0.0

    async def _task_due(self) -> bool:
        """Whether a task is due now (True after a database error: let the claim report it)."""
        try:
            async with self._connection() as conn:
                seconds = await store.seconds_until_due(conn)
        except _DB_ERRORS:
            return True
        return seconds is not None and seconds <= 0

    async def _claim(self, batch_size: int) -> list[ClaimedTask]:
        started = time.perf_counter()
        lease_ends = time.monotonic() + self.settings.lease_seconds  # no later than the DB's
        async with self._connection() as conn:
            claimed = await self._gate.claim(conn, batch_size, self.settings.lease_seconds)
        self.metrics.claim_latency.observe(time.perf_counter() - started)
        self._ready.extend((task, lease_ends) for task in claimed if not task.held)
        self._start_ready()
        return claimed

    async def _seconds_until_due(self) -> float:
        """Seconds until the next live task falls due, at most MAX_IDLE_SECONDS."""
        async with self._connection() as conn:
            seconds = await store.seconds_until_due(conn)
        if seconds is None:
            return MAX_IDLE_SECONDS
        # Due now but not claimed: locked by another worker's claim, so look again soon.
        return min(MAX_IDLE_SECONDS, max(seconds, 0.01))

    async def _listen_loop(self, conninfo: str) -> None:
        """Wake the claimer on every new (or retried) task, and each service on its
        channel."""
        woken = {service.channel: self._contexts[service.name].wake
                 for service in self.services}
        failures = 0
        while not self._stopping.is_set():
            try:
                # Keepalives (connection parameters, not session state): an idle listener
                # behind a NAT or pooler that silently drops it would otherwise wait
                # forever (the claimer's idle timer still runs).
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, application_name="taskman-worker-listen",
                    keepalives_idle=60, keepalives_interval=10, keepalives_count=3,
                ) as conn:
                    await store.listen(conn)
                    for service in self.services:
                        await service.subscribe(conn)
                    failures = 0
                    self._listening = True
                    self._wake.set()  # whatever was announced while we were not listening
                    for wake in woken.values():
                        wake.set()
                    try:
                        async for notice in conn.notifies():
                            if notice.channel in woken:
                                woken[notice.channel].set()
                            elif _announces_pending(notice.payload):
                                self._wake.set()
                    finally:
                        self._listening = False  # the claimer checks the due index meanwhile
            except psycopg.Error as exc:
                failures += 1
                wait = db.retry_delay(failures)
                log.warning("listening for task changes failed (%s); retrying in %.1fs",
                            exc, wait)
                await self._pause(wait)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or until the worker is stopping."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _after_db_error(self, doing: str, exc: Exception, failures: int) -> float:
        """Log a failed round trip, drop dead pooled connections; returns how long to wait."""
        wait = db.retry_delay(failures)
        log.warning("%s failed (%s); retrying in %.1fs", doing, exc, wait)
        await self._pool.check()  # after a restart every idle connection is dead: drop all now
        return wait

    # Polling --------------------------------------------------------------------------

    def _start_ready(self) -> None:
        """Start polls of ready tasks while slots are free (none once stopping: those
        tasks' leases are released)."""
        while self._ready and self._polling < self.settings.concurrency \
                and not self._stopping.is_set():
            self._polling += 1
            poll = asyncio.create_task(self._poll(*self._ready.popleft()))
            self._polls.add(poll)
            poll.add_done_callback(self._poll_done)

    async def _poll(self, task: ClaimedTask, lease_ends: float) -> None:
        outcome: PollOutcome | None = None
        host = host_key(task.request_url)
        try:
            await self._hosts.acquire(host)
            try:
                # A task that waited for its host past its lease may already be someone
                # else's: leave it to them.
                # A submit must also end before the lease does, or another worker
                # could send it a second time.
                needed = self.settings.poll_timeout_seconds if task.submit_url else 0.0
                if self._circuits.withheld(host, task.owner,
                                           lease_ends - self.settings.lease_seconds):
                    # Its circuit opened after it was claimed: back to the schedule, unsent.
                    outcome = {"task_id": task.task_id, "worker_id": self.worker_id,
                               "unsent": True}
                elif time.monotonic() + needed < lease_ends:
                    # Neither raises. A task still to be submitted is submitted instead.
                    outcome = await (self._submitter.submit(task) if task.submit_url
                                     else self._poller.poll(task))
                else:
                    log.warning("task %s waited for its host past its lease; not polled",
                                task.task_id, extra={"task_id": task.task_id})
            finally:
                self._hosts.release(host)
        finally:
            self._polling -= 1
            self._start_ready()
            if self._claim_room():  # waking the claimer for less would only put it back
                self._slot_freed.set()
        if outcome is not None:
            outcome["host"], outcome["owner"] = host, task.owner
            if not outcome.get("unsent"):
                self.metrics.count_poll(outcome)
            self._circuits.observe(host, task.owner, outcome)
            self._outcomes.append(outcome)
            self._outcome_added.set()

    def _poll_done(self, poll: asyncio.Task[None]) -> None:
        self._polls.discard(poll)
        if not poll.cancelled() and poll.exception() is not None:
            log.error("a poll failed unexpectedly; its task is polled again when its lease "
                      "ends", exc_info=poll.exception())

    async def _finish_polls(self, grace: float) -> None:
        """Let in-flight polls finish for up to `grace` seconds, then cancel the rest."""
        if not self._polls:
            return
        log.info("waiting up to %.1fs for %d polls in flight", grace, len(self._polls))
        _, unfinished = await asyncio.wait(set(self._polls), timeout=grace)
        for poll in unfinished:
            poll.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    # Recording ------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        """Write finished polls in batches until drained at shutdown."""
        while True:
            if not self._outcomes:
                if self._draining:
                    return
                # Cleared only while nothing waits: an outcome added (or the drain begun)
                # at any later point sets it again, so no wakeup is lost.
                self._outcome_added.clear()
                await self._outcome_added.wait()
                continue
            if self._polling and len(self._outcomes) < RECORD_BATCH and not self._draining:
                await asyncio.sleep(RECORD_DELAY_SECONDS)  # let running polls join the batch
            batch = self._outcomes[:RECORD_BATCH]
            del self._outcomes[:RECORD_BATCH]
            await self._record(batch)
            self._recorded += len(batch)
            self._circuits.recorded(self._recorded)
            self._wake_for(batch)

    def _wake_for(self, batch: list[PollOutcome]) -> None:
        """Wake the claimer if a task just recorded may fall due before it would wake.

        Also while it is not sleeping: it may be reading the next due time, from a
        snapshot taken before this batch was written.
        """
        delays = [o.get("delay_seconds") or 0.0 for o in batch
                  if o.get("status") not in ("completed", "failed")]
        if delays and (not self._claimer_wakes_at
                       or time.monotonic() + min(delays) < self._claimer_wakes_at):
            self._wake.set()

    async def _record(self, batch: list[PollOutcome]) -> None:
        """Record `batch`, retrying through database outages.

        An outcome the database cannot store (e.g. a result with a NUL character) would
        refuse its whole batch: then each is recorded on its own, and one still refused
        is recorded as an unreadable answer so its task moves on.
        """
        failures = 0
        while True:
            try:
                await self._record_batch(batch)
                return
            except _DB_ERRORS as exc:
                failures += 1
                await asyncio.sleep(
                    await self._after_db_error(f"recording {len(batch)} outcomes", exc, failures))
            except psycopg.DataError as exc:
                if len(batch) == 1:
                    log.warning("outcome of task %s refused (%s); recorded as unreadable",
                                batch[0]["task_id"], exc)
                    batch = [_unstorable(batch[0], str(exc), self._unstorable_delay())]
                else:
                    for outcome in batch:
                        await self._record([outcome])
                    return
            except psycopg.Error:
                log.exception("recording %d outcomes failed; their tasks are polled again "
                              "when their leases end", len(batch))
                return

    async def _record_batch(self, batch: list[PollOutcome]) -> None:
        started = time.perf_counter()
        polled = "[" + ",".join(self._serialized(o) for o in batch
                                if o.get("status") != "cancelled" and not o.get("unsent")) + "]"
        # A remote's "cancelled" is an answer: its host never holds it back.
        cancelled = [self._serialized(o) for o in batch if o.get("status") == "cancelled"]
        async with self._connection() as conn:
            if not cancelled:
                await self._gate.record(conn, batch, polled)
            else:  # rare: a second statement, in one transaction with the first
                async with conn.transaction():
                    await self._gate.record(conn, batch, polled)
                    await store.record_remote_cancellations(conn, "[" + ",".join(cancelled) + "]")
        self.metrics.record_latency.observe(time.perf_counter() - started)

    def _serialized(self, outcome: PollOutcome) -> str:
        """`outcome` as JSON; one that cannot be written out (a result nested too deeply,
        say) or stored (a result over MAX_RESULT_BYTES, which the database would refuse
        with the whole batch) becomes an unreadable answer, so that it fails only its own
        task."""
        try:
            text = json.dumps(outcome)
        except (ValueError, TypeError, RecursionError) as exc:
            why = f"{type(exc).__name__}: {exc}"[:500]
        else:
            if len(text) <= MAX_RESULT_BYTES:
                return text
            # As the database counts it: the result's JSON text in UTF-8.
            size = len(json.dumps(outcome.get("result"), ensure_ascii=False).encode())
            if size <= MAX_RESULT_BYTES:
                return text
            why = (f"its result is {size:,} bytes of JSON, over the {MAX_RESULT_BYTES:,}"
                   " a task holds")
        log.warning("outcome of task %s cannot be stored (%s); recorded as unreadable",
                    outcome.get("task_id"), why)
        return json.dumps(_unstorable(outcome, why, self._unstorable_delay()), default=str)

    def _unstorable_delay(self) -> float:
        return max(self.settings.min_poll_interval_seconds, self.settings.retry_base_seconds)

    async def _release_leases(self) -> None:
        try:
            async with asyncio.timeout(SHUTDOWN_DB_SECONDS), self._connection() as conn:
                released = await store.release_tasks(conn, self.worker_id)
        except (psycopg.Error, PoolTimeout, TimeoutError) as exc:
            log.error("could not release leases (%r); they expire in %ds", exc,
                      self.settings.lease_seconds)
            return
        if released:
            log.info("released %d unfinished tasks", released, extra={"released": released})

    # Periodic jobs --------------------------------------------------------------------

    async def _job_loop(self, job: PeriodicJob) -> None:
        while not self._stopping.is_set():
            try:
                async with self._connection() as conn:
                    await job.run_once(conn)
            except _DB_ERRORS as exc:
                log.warning("%s failed (%s); next run in %.1fs", job.name, exc,
                            job.interval_seconds)
            except Exception:
                log.exception("%s failed; next run in %.1fs", job.name, job.interval_seconds)
            await self._pause(job.interval_seconds)


class _HostLimits:
    """One semaphore per host key, kept only while some poll holds or waits for it."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._hosts: dict[str | None, tuple[asyncio.Semaphore, list[int]]] = {}

    async def acquire(self, host: str | None) -> None:
        """Wait for one of `host`'s slots; once acquired, release it exactly once."""
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = (asyncio.Semaphore(self.per_host), [0])
        entry[1][0] += 1
        try:
            await entry[0].acquire()
        except BaseException:  # cancelled while waiting: it holds no slot
            self._leave(host, entry[1])
            raise

    def release(self, host: str | None) -> None:
        """Give back a slot `acquire` took."""
        semaphore, users = self._hosts[host]
        semaphore.release()
        self._leave(host, users)

    def _leave(self, host: str | None, users: list[int]) -> None:
        users[0] -= 1
        if not users[0]:
            del self._hosts[host]


def _announces_pending(payload: str) -> bool:
    """Whether a ``taskman`` NOTIFY says a task is pending (new or retried). Most say a
    task finished: those are told apart without decoding them (the ids are UUIDs, so
    ``"pending"`` appears only as a status)."""
    return '"pending"' in payload and json.loads(payload).get("status") == "pending"


def _unstorable(outcome: PollOutcome, why: str, delay: float) -> PollOutcome:
    """`outcome` reduced to an unreadable answer: what could not be stored is dropped."""
    reduced: PollOutcome = {"ok": False, "error_code": "invalid_response", "delay_seconds": delay,
                            "reason": "unstorable_answer",
                            "raw_error": f"the answer could not be stored: {why}"}
    reduced["task_id"], reduced["worker_id"] = outcome["task_id"], outcome["worker_id"]
    if outcome.get("submitted"):
        # The request was sent and answered: sending it again could start a second job.
        reduced["submitted"], reduced["status"] = True, "failed"
    if "http_status" in outcome:
        reduced["http_status"] = outcome["http_status"]
    if "latency_ms" in outcome:
        reduced["latency_ms"] = outcome["latency_ms"]
    return reduced
