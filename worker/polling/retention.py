"""Retention: the worker deletes finished tasks and their data in small batches.

Every ``RETENTION_INTERVAL_SECONDS`` the worker prunes, batch after batch (each its
own short transaction), what ended more than ``TASKMAN_RETENTION_DAYS`` ago: task rows,
history, private and schedule rows, delivered and given-up notifications
(``taskman.prune_finished_tasks``); then what belongs to no task and was not touched
for as long: host rows with nothing to keep and host alerts delivered or given up
(``taskman.prune_idle_hosts``). While Supabase Realtime streams taskman.tasks the task
rows stay (README: Retention).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from worker import store
from worker.config import Settings
from worker.store import Row

log = logging.getLogger(__name__)

RETENTION_INTERVAL_SECONDS = 60.0
RETENTION_BATCH = 200
# A pause between batches, so that retention never competes for long with polling.
_BETWEEN_BATCHES_SECONDS = 0.01
_MAX_BATCHES_A_ROUND = 500


class Retention:
    def __init__(self, settings: Settings) -> None:
        self.older_than_seconds = settings.retention_days * 86_400

    @property
    def enabled(self) -> bool:
        return self.older_than_seconds > 0

    async def run_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Prune until nothing is left (or a round's cap); returns how many tasks."""
        pruned = await in_batches(conn, store.aprune_finished_tasks, "tasks",
                                  self.older_than_seconds)
        if pruned:
            log.info("retention pruned %d finished tasks", pruned, extra={"pruned": pruned})
        hosts = await in_batches(conn, store.aprune_idle_hosts, "hosts", self.older_than_seconds)
        if hosts:
            log.info("retention pruned %d idle hosts", hosts, extra={"pruned_hosts": hosts})
        return pruned


async def in_batches(conn: psycopg.AsyncConnection[Any], step: Callable[..., Awaitable[Row]],
                     counted: str, older_than_seconds: float) -> int:
    """Batches of `step` (small, each its own transaction) until it is done, or a round's
    cap; the sum of their `counted`."""
    total = 0
    for _ in range(_MAX_BATCHES_A_ROUND):
        row = await step(conn, older_than_seconds, RETENTION_BATCH)
        total += row[counted]
        if row["done"]:
            break
        await asyncio.sleep(_BETWEEN_BATCHES_SECONDS)
    return total
