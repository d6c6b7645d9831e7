"""``GET /events``: task changes as Server-Sent Events, from one shared LISTEN connection.

The database sends ``NOTIFY taskman`` with ``{task_id, status, user_id}`` on every
insert and status change. One connection listens for the whole edge and fans each
notification out to the subscribers allowed to see it: the service sees every
task, a user only their own.

Behind a transaction pooler with no listen URL, LISTEN does not work: then, while
anyone is subscribed, one connection reads the same changes back from ``task_events``
every ``change_check_interval`` seconds (the events each insert and status change
writes), so streams carry the same events, a fraction of a second later.

Each open stream holds a socket, so streams are capped per caller and in total:
one user cannot take the file descriptors every other request needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg

from worker import store
from worker.edge.auth import Principal

log = logging.getLogger(__name__)

# A subscriber this far behind is disconnected (it reconnects and refetches)
# rather than buffering without bound.
QUEUE_SIZE = 1_000
RECONNECT_MAX_SECONDS = 30.0
# A new stream waits at most this long for the hub to follow changes before it is told
# it is connected (the database may be down).
READY_SECONDS = 3.0
# Polling task_events: how many a read, and how long an id skipped in the sequence may
# still turn up (its transaction not yet committed) before it counts as rolled back.
CHANGES_BATCH = 1_000
MISSING_SECONDS = 10.0
MAX_MISSING = 10_000


class Subscription:
    """One connected client: what it may see and its pending events."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        self.released = False

    def may_see(self, event: dict[str, Any]) -> bool:
        return self.principal.is_service or (
            self.principal.user_id is not None and event.get("user_id") == self.principal.user_id
        )


class ChangeCursor:
    """Follows ``task_events`` by id without missing an event committed late.

    Ids are taken in insert order but become visible in commit order, so an id
    skipped by one read may show up in the next: it is read again (``missing``) for
    up to ``MISSING_SECONDS``, after which it counts as rolled back.
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self._missing: dict[int, float] = {}  # id -> when it was first skipped

    @property
    def missing(self) -> list[int]:
        return list(self._missing)

    def advance(self, rows: Sequence[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """Take the rows of a ``task_changes`` read; returns the events to publish."""
        events = []
        for row in rows:
            event_id = int(row["event_id"])
            if event_id > self.after:
                for skipped in range(max(self.after + 1, event_id - MAX_MISSING), event_id):
                    self._missing[skipped] = now
                self.after = event_id
            else:
                self._missing.pop(event_id, None)
            if row["change"]:
                user_id = row["user_id"]
                events.append({"task_id": str(row["task_id"]), "status": row["status"],
                               "user_id": None if user_id is None else str(user_id)})
        for event_id, since in list(self._missing.items()):
            if now - since > MISSING_SECONDS or len(self._missing) > MAX_MISSING:
                del self._missing[event_id]
        return events


class StreamLimitReached(Exception):
    """The caller, or the whole edge, already holds as many streams as allowed."""


def stream_owner(principal: Principal) -> str:
    """Whose quota a stream counts against: the user, or the service."""
    return principal.user_id or principal.role


class TaskEventHub:
    """Fans task changes out to subscribers: from LISTEN on ``listen_conninfo``, or when
    that is None by reading them from ``conninfo`` every ``poll_interval`` seconds.

    At most ``max_streams`` subscriptions at once, and ``max_streams_per_owner`` for
    each user (the service counts as one).
    """

    def __init__(self, listen_conninfo: str | None, *, conninfo: str | None = None,
                 connection_kwargs: dict[str, Any] | None = None,
                 poll_interval: float = 0.5, max_streams: int = 256,
                 max_streams_per_owner: int = 5) -> None:
        if listen_conninfo is None and conninfo is None:
            raise ValueError("give listen_conninfo, or conninfo to poll for changes")
        self.max_streams = max_streams
        self.max_streams_per_owner = max_streams_per_owner
        self._owners: Counter[str] = Counter()
        self._conninfo = listen_conninfo
        self._poll_conninfo = conninfo
        self._connection_kwargs = connection_kwargs or {}
        self._poll_interval = poll_interval
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # following changes: what happens now reaches streams
        self._wanted = asyncio.Event()  # someone is subscribed (polling only)

    @property
    def polling(self) -> bool:
        """Whether changes are polled (no LISTEN)."""
        return self._conninfo is None

    async def start(self) -> None:
        follow = self._poll() if self.polling else self._listen()
        self._task = asyncio.create_task(follow, name="taskman-events")

    async def wait_ready(self, timeout: float = READY_SECONDS) -> bool:
        """Wait until changes from now on reach subscribers; False after ``timeout``."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop listening and end every open stream."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for subscription in list(self._subscribers):
            self._close(subscription)

    def subscribe(self, principal: Principal) -> Subscription:
        """Start receiving the events ``principal`` may see; ``unsubscribe`` when done.

        Raises StreamLimitReached past either cap.
        """
        owner = stream_owner(principal)
        if self._owners[owner] >= self.max_streams_per_owner:
            raise StreamLimitReached(
                f"You already hold {self.max_streams_per_owner} open event streams; "
                "close one first.")
        if sum(self._owners.values()) >= self.max_streams:
            raise StreamLimitReached("The edge holds as many event streams as it serves.")
        subscription = Subscription(principal)
        self._subscribers.add(subscription)
        self._owners[owner] += 1
        self._wanted.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription`` and free its place; idempotent."""
        self._subscribers.discard(subscription)
        if not subscription.released:
            subscription.released = True
            owner = stream_owner(subscription.principal)
            self._owners[owner] -= 1
            if self._owners[owner] <= 0:
                del self._owners[owner]

    def publish(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to every subscriber that may see it."""
        for subscription in list(self._subscribers):
            if not subscription.may_see(event):
                continue
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping a slow /events subscriber")
                self._close(subscription)

    def _close(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        # Make room for the end-of-stream marker even in a full queue.
        while subscription.queue.full():
            subscription.queue.get_nowait()
        subscription.queue.put_nowait(None)

    async def _listen(self) -> None:
        assert self._conninfo is not None
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name="taskman-edge-events"
                ) as conn:
                    await store.listen(conn)
                    delay = 1.0
                    self._ready.set()
                    try:
                        async for notify in conn.notifies():
                            self._publish_payload(notify.payload)
                    finally:
                        self._ready.clear()
            except psycopg.Error as exc:
                # Events sent while reconnecting are missed; clients refetch on reconnect.
                log.warning("events listener: %s; reconnecting in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _poll(self) -> None:
        """While anyone is subscribed, read new task changes every ``poll_interval``.

        The cursor survives a lost connection, so changes made meanwhile still arrive
        once it is back.
        """
        assert self._poll_conninfo is not None
        cursor: ChangeCursor | None = None
        delay = 1.0
        while True:
            await self._wanted.wait()
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._poll_conninfo, autocommit=True,
                    application_name="taskman-edge-events", **self._connection_kwargs,
                ) as conn:
                    if cursor is None:
                        cursor = ChangeCursor(await store.latest_task_event_id(conn))
                    self._ready.set()
                    delay = 1.0
                    while self._subscribers:
                        await self._read_changes(conn, cursor)
                        await asyncio.sleep(self._poll_interval)
                    cursor = None  # nobody follows: the next subscriber starts from then
                    self._ready.clear()
                    if not self._subscribers:
                        self._wanted.clear()
            except psycopg.Error as exc:
                self._ready.clear()
                log.warning("events poller: %s; reconnecting in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _read_changes(self, conn: psycopg.AsyncConnection[Any],
                            cursor: ChangeCursor) -> None:
        while True:
            after = cursor.after
            rows = await store.task_changes(conn, after=after, missing=cursor.missing,
                                            limit=CHANGES_BATCH)
            for event in cursor.advance(rows, time.monotonic()):
                self.publish(event)
            if sum(row["event_id"] > after for row in rows) < CHANGES_BATCH:
                return  # read up to now; else more are waiting

    def _publish_payload(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed taskman notification")
            return
        if isinstance(event, dict):
            self.publish(event)


async def event_stream(
    hub: TaskEventHub, subscription: Subscription, keepalive_seconds: float
) -> AsyncIterator[str]:
    """The SSE text for one subscribed client: a ``connected`` comment once the hub follows
    changes, then ``event: task`` messages, and a keep-alive comment whenever the line
    is quiet."""
    await hub.wait_ready()
    yield "retry: 3000\n: connected\n\n"
    while True:
        try:
            event = await asyncio.wait_for(subscription.queue.get(), keepalive_seconds)
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        if event is None:
            return
        yield f"event: task\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
