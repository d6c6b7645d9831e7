"""``GET /events``: task changes as Server-Sent Events, from one shared LISTEN connection.

The database sends ``NOTIFY taskman`` with ``{task_id, status, user_id}`` on every
insert and status change. One connection listens for the whole edge and fans each
notification out to the subscribers allowed to see it: the service sees every
task, a user only their own.

Each open stream holds a socket, so streams are capped per caller and in total:
one user cannot take the file descriptors every other request needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from worker import store
from worker.edge.auth import Principal

log = logging.getLogger(__name__)

# A subscriber this far behind is disconnected (it reconnects and refetches)
# rather than buffering without bound.
QUEUE_SIZE = 1_000
RECONNECT_MAX_SECONDS = 30.0


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


class StreamLimitReached(Exception):
    """The caller, or the whole edge, already holds as many streams as allowed."""


def stream_owner(principal: Principal) -> str:
    """Whose quota a stream counts against: the user, or the service."""
    return principal.user_id or principal.role


class TaskEventHub:
    """Listens on the ``taskman`` channel and fans notifications out to subscribers.

    At most ``max_streams`` subscriptions at once, and ``max_streams_per_owner`` for
    each user (the service counts as one).
    """

    def __init__(self, conninfo: str, max_streams: int, max_streams_per_owner: int) -> None:
        self._conninfo = conninfo
        self.max_streams = max_streams
        self.max_streams_per_owner = max_streams_per_owner
        self._subscribers: set[Subscription] = set()
        self._owners: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="taskman-events-listener")

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
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name="taskman-edge-events"
                ) as conn:
                    await store.listen(conn)
                    delay = 1.0
                    async for notify in conn.notifies():
                        self._publish_payload(notify.payload)
            except psycopg.Error as exc:
                # Events sent while reconnecting are missed; clients refetch on reconnect.
                log.warning("events listener: %s; reconnecting in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _publish_payload(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed taskman notification")
            return
        if isinstance(event, dict):
            self.publish(event)


async def event_stream(subscription: Subscription, keepalive_seconds: float) -> AsyncIterator[str]:
    """The SSE text for one subscribed client: a ``connected`` comment, then ``event:
    task`` messages, and a keep-alive comment whenever the line is quiet."""
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
