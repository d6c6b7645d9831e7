"""Retention: finished tasks' history and service-side rows go after the retention period,
live tasks and undelivered notifications never do."""

from __future__ import annotations

import asyncio
import json

import psycopg

from tests.factories import create_task, events, schedule_row
from tests.test_cli import taskman
from tests.worker_harness import worker_settings
from worker.polling.retention import Retention


def _finish(conn, task_id: str, ended_ago: str) -> None:
    """Complete the task through the worker's functions, then age its end by `ended_ago`."""
    conn.execute("update taskman_private.task_schedule set lease_owner = 'w1'"
                 " where task_id = %s", (task_id,))  # as a claim by w1 leaves it
    conn.execute("select * from taskman.record_poll_results(%s)", (json.dumps([
        {"task_id": task_id, "worker_id": "w1", "ok": True, "status": "completed",
         "raw_response": "{\"status\": \"done\"}"}]),))
    conn.execute("update taskman.tasks set completed_at = now() - %s::interval"
                 " where task_id = %s", (ended_ago, task_id))


def _left(conn, task_id: str) -> dict[str, int]:
    counts = {}
    for name, table in [("events", "taskman.task_events"),
                        ("private", "taskman_private.task_private"),
                        ("schedule", "taskman_private.task_schedule"),
                        ("outbox", "taskman_private.outbox")]:
        counts[name] = conn.execute(f"select count(*) as n from {table} where task_id = %s",
                                    (task_id,)).fetchone()["n"]
    return counts


def _scenario(conn) -> dict[str, str]:
    old = create_task(conn, poll_headers={"X-Key": "k"},
                      callback_url="https://hooks.example.com/a")["task_id"]
    _finish(conn, old, "10 days")
    conn.execute("update taskman_private.outbox set delivered_at = now() where task_id = %s",
                 (old,))
    undelivered = create_task(conn, callback_url="https://hooks.example.com/b")["task_id"]
    _finish(conn, undelivered, "10 days")
    recent = create_task(conn)["task_id"]
    _finish(conn, recent, "1 day")
    live = create_task(conn)["task_id"]
    return {"old": old, "undelivered": undelivered, "recent": recent, "live": live}


def test_prune_dry_run_counts_and_changes_nothing_then_prune_deletes(conn, database_url) -> None:
    ids = _scenario(conn)
    before = {name: _left(conn, task_id) for name, task_id in ids.items()}

    dry = taskman(database_url, "prune", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would prune 1 finished tasks: 3 events, 1 private rows, "
                                 "1 schedule rows, 1 delivered notifications")
    assert {name: _left(conn, task_id) for name, task_id in ids.items()} == before

    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 finished tasks: 3 events, 1 private rows, "
                                  "1 schedule rows, 1 delivered notifications")
    assert _left(conn, ids["old"]) == {"events": 0, "private": 0, "schedule": 0, "outbox": 0}
    # Undelivered notifications keep their task's data; recent and live tasks are untouched.
    for name in ("undelivered", "recent", "live"):
        assert _left(conn, ids[name]) == before[name]
    # The task row stays readable (Realtime publishes taskman.tasks: no row-by-row deletes).
    row = conn.execute("select taskman.task_json(t) as j from taskman.tasks t"
                       " where task_id = %s", (ids["old"],)).fetchone()["j"]
    assert (row["status"], row["attempt_count"]) == ("completed", 1)

    again = taskman(database_url, "prune", "--older-than", "7d")
    assert again.stdout.startswith("pruned 0 finished tasks")


def test_prune_refuses_an_age_it_cannot_read(database_url) -> None:
    result = taskman(database_url, "prune", "--older-than", "soon")
    assert result.returncode == 2 and "is not an age like 7d" in result.stderr


def test_the_workers_retention_job_prunes_in_batches_past_the_period(conn,
                                                                     database_url) -> None:
    ids = [create_task(conn)["task_id"] for _ in range(450)]
    for task_id in ids:
        _finish(conn, task_id, "2 hours")
    live = create_task(conn)["task_id"]
    retention = Retention(worker_settings(database_url, TASKMAN_RETENTION_DAYS=str(1 / 24)))

    async def one_round() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            return await retention.run_once(c)

    assert asyncio.run(one_round()) == 450  # three batches of at most 200
    assert conn.execute("select count(*) as n from taskman.task_events"
                        " where task_id = any(%s::uuid[])", (ids,)).fetchone()["n"] == 0
    assert schedule_row(conn, live) is not None and events(conn, live)
    assert asyncio.run(one_round()) == 0


def test_retention_days_zero_keeps_everything(database_url) -> None:
    assert not Retention(worker_settings(database_url, TASKMAN_RETENTION_DAYS="0")).enabled
    assert Retention(worker_settings(database_url)).older_than_seconds == 30 * 86_400
