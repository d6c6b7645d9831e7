"""Notifications undelivered for too long are given up.

A notification is given up after ``TASKMAN_OUTBOX_MAX_ATTEMPTS`` failed attempts, but one
whose receiver's circuit is open spends none (``callback_hosts``): a receiver that never
comes back would keep its callbacks, and so their tasks, forever. Every
``EXPIRY_INTERVAL_SECONDS`` the worker gives up, in small batches, what is still
undelivered ``TASKMAN_OUTBOX_MAX_AGE_HOURS`` after it was enqueued
(``taskman.give_up_stale_notifications``): the task's history says
``notification_given_up`` with reason ``expired``, and retention can take the task.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from worker import store
from worker.config import Settings
from worker.polling.retention import in_batches

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_SECONDS = 60.0


class NotificationExpiry:
    def __init__(self, settings: Settings) -> None:
        self.older_than_seconds = settings.outbox_max_age_hours * 3_600

    @property
    def enabled(self) -> bool:
        return self.older_than_seconds > 0

    async def run_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Give up what is undelivered past the age; returns how many."""
        given_up = await in_batches(conn, store.agive_up_stale_notifications, "given_up",
                                    self.older_than_seconds)
        if given_up:
            log.warning("gave up %d notifications undelivered for %g hours", given_up,
                        self.older_than_seconds / 3_600, extra={"given_up": given_up})
        return given_up
