"""Small factories for test data, going through the public SQL API."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

USER_A = str(uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001"))
USER_B = str(uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002"))


def create_task(conn: psycopg.Connection, **args: Any) -> dict[str, Any]:
    """``create_task`` called by a trusted direct connection (the worker's view)."""
    args.setdefault("poll_url", "https://api.example.com/status/1")
    named = ", ".join(f"{k} => %({k})s" for k in args)
    values = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in args.items()}
    return conn.execute(f"select taskman.create_task({named}) as r", values).fetchone()["r"]


def task_row(conn: psycopg.Connection, task_id: str) -> dict[str, Any]:
    return conn.execute("select * from taskman.tasks where task_id = %s", (task_id,)).fetchone()


def events(conn: psycopg.Connection, task_id: str) -> list[dict[str, Any]]:
    return conn.execute(
        "select * from taskman.task_events where task_id = %s order by event_id", (task_id,)
    ).fetchall()


def count_status(conn: psycopg.Connection, status: str) -> int:
    return conn.execute("select count(*) as n from taskman.tasks where status = %s",
                        (status,)).fetchone()["n"]


def set_status(conn: psycopg.Connection, task_id: str, status: str) -> None:
    conn.execute("update taskman.tasks set status = %s where task_id = %s", (status, task_id))


def schedule_row(conn: psycopg.Connection, task_id: str) -> dict[str, Any]:
    """The worker's side of a task: next poll, lease, poll counters (service-only)."""
    return conn.execute("select * from taskman_private.task_schedule where task_id = %s",
                        (task_id,)).fetchone()


def make_due(conn: psycopg.Connection, task_id: str, interval: str = "0 seconds") -> None:
    """Move the task's next poll to now() + `interval` (as time passing would)."""
    conn.execute("update taskman_private.task_schedule set next_poll_at = now() + %s::interval"
                 " where task_id = %s", (interval, task_id))


def complete_with_unbounded_result(conn: psycopg.Connection, task_id: str, result: str) -> None:
    """Complete a task with `result` (JSON text) as a database from before Taskman bounded
    stored JSON may hold it: deeper or with larger numbers than it now accepts anywhere.
    Written with the row checks off, then completed through update_task (a superuser
    connection)."""
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("update taskman.tasks set result = %s::jsonb where task_id = %s",
                     (result, task_id))
        conn.execute("set local session_replication_role = origin")
        conn.execute("select taskman.update_task(%s, 'completed')", (task_id,))
