"""The store: one typed function per statement of ``queries.sql``.

This is the only module that knows the queries' names. Each function takes the
connection to run on (inside ``db.api_session`` for the edge's callers) and picks its
own row shape, so callers never depend on a connection's row factory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import RowMaker, dict_row, scalar_row

from worker import db
from worker.domain import ClaimedTask, JsonObject, TaskCreate, TaskReport

Row = dict[str, Any]
_JSON_ARGUMENTS = ("poll_headers", "poll_body", "poll_config", "metadata", "submit_headers",
                   "submit_body", "callback_headers")


def _q(name: str) -> str:
    """The text of the named query."""
    return db.queries()[name]


def _scalar(conn: psycopg.Connection[Any], name: str, params: Row | None = None) -> Any:
    """The single value the query returns (None when it returns no row)."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(_q(name), params).fetchone()


async def _ascalar(conn: psycopg.AsyncConnection[Any], name: str,
                   params: Row | None = None) -> Any:
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(_q(name), params)
        return await cur.fetchone()


def _rows(conn: psycopg.Connection[Any], name: str, params: Row | None = None) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_q(name), params).fetchall()


async def _arow(conn: psycopg.AsyncConnection[Any], name: str, params: Row) -> Row:
    """The single row the query returns."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_q(name), params)
        row = await cur.fetchone()
        assert row is not None
        return row


# --- migrations and the embedded database -----------------------------------------------


def is_supabase(conn: psycopg.Connection[Any]) -> bool:
    """Whether the database is a Supabase project (which needs no compatibility script)."""
    return bool(_scalar(conn, "is_supabase"))


def lock_migrations(conn: psycopg.Connection[Any]) -> None:
    """Wait for, then hold until the transaction ends, the lock that serialises
    ``taskman migrate`` runs."""
    _scalar(conn, "lock_migrations")


def create_migrations_table(conn: psycopg.Connection[Any]) -> None:
    """Create the Supabase CLI's bookkeeping table if it is missing."""
    conn.execute(_q("create_migrations_table"))


def exposed_schemas(conn: psycopg.Connection[Any]) -> list[str] | None:
    """The schemas PostgREST exposes, when the database records them; else None."""
    schemas = _scalar(conn, "exposed_schemas")
    return None if schemas is None else [s.strip() for s in schemas.split(",") if s.strip()]


def api_schema_exists(conn: psycopg.Connection[Any]) -> bool:
    """Whether the schema ``taskman`` is there."""
    return bool(_scalar(conn, "api_schema_exists"))


def applied_migrations(conn: psycopg.Connection[Any]) -> set[str]:
    """The versions already applied."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return set(cur.execute(_q("applied_migrations")).fetchall())


def record_migration(conn: psycopg.Connection[Any], version: str, name: str,
                     statements: str) -> None:
    conn.execute(_q("record_migration"),
                 {"version": version, "name": name, "statements": statements})


def database_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return bool(_scalar(conn, "database_exists", {"name": name}))


def create_taskman_database(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_q("create_taskman_database"))


# --- tasks, as the edge and the CLI see them ----------------------------------------------


def create_task(conn: psycopg.Connection[Any], task: TaskCreate) -> Row:
    """``create_task``: the new task with its callback token, or the existing one on replay."""
    args = task.model_dump()
    for name in _JSON_ARGUMENTS:
        args[name] = db.json_arg(args[name])
    return _scalar(conn, "create_task", args)


def get_task(conn: psycopg.Connection[Any], task_id: UUID | str) -> Row | None:
    """The task's public JSON, or None if it does not exist or the caller may not see it."""
    return _scalar(conn, "get_task", {"task_id": task_id})


def list_tasks(
    conn: psycopg.Connection[Any],
    *,
    limit: int,
    statuses: Sequence[str] | None = None,
    task_type: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    before: tuple[datetime, UUID] | None = None,
) -> list[Row]:
    """Visible tasks, newest first; ``before`` is the (created_at, task_id) keyset cursor."""
    before_created_at, before_task_id = before or (None, None)
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(_q("list_tasks"), {
            "statuses": list(statuses) if statuses else None, "task_type": task_type,
            "created_from": created_from, "created_to": created_to,
            "before_created_at": before_created_at, "before_task_id": before_task_id,
            "limit": limit,
        }).fetchall()


def task_visible(conn: psycopg.Connection[Any], task_id: UUID | str) -> bool:
    return bool(_scalar(conn, "task_visible", {"task_id": task_id}))


def task_events(conn: psycopg.Connection[Any], task_id: UUID | str, *, after: int,
                limit: int) -> list[Row]:
    """The task's events with ids above ``after``, oldest first."""
    return _rows(conn, "task_events", {"task_id": task_id, "after": after, "limit": limit})


def get_task_status(conn: psycopg.Connection[Any], task_id: UUID | str) -> Row:
    return _scalar(conn, "get_task_status", {"task_id": task_id})


def update_task(conn: psycopg.Connection[Any], task_id: UUID | str, report: TaskReport,
                callback_token: str | None = None) -> Row:
    """``update_task``: a report by the service, or by the holder of ``callback_token``."""
    args = report.model_dump(include=set(TaskReport.model_fields))
    args["result"] = db.json_arg(args["result"])
    return _scalar(conn, "update_task",
                   {**args, "task_id": task_id, "callback_token": callback_token})


def set_metadata(conn: psycopg.Connection[Any], task_id: UUID | str,
                 metadata: JsonObject) -> Row | None:
    """Replace the task's metadata; None if the caller may not see the task."""
    return _scalar(conn, "set_metadata",
                   {"task_id": task_id, "metadata": db.json_arg(metadata)})


def cancel_task(conn: psycopg.Connection[Any], task_id: UUID | str) -> Row:
    return _scalar(conn, "cancel_task", {"task_id": task_id})


def retry_task(conn: psycopg.Connection[Any], task_id: UUID | str) -> Row:
    return _scalar(conn, "retry_task", {"task_id": task_id})


def rotate_callback_secret(conn: psycopg.Connection[Any], keep_previous_seconds: int) -> Row:
    """The caller's new callback signing secret (shown once); the one it replaces keeps
    signing for ``keep_previous_seconds``."""
    return _scalar(conn, "rotate_callback_secret",
                   {"keep_previous_seconds": keep_previous_seconds})


def task_stats(conn: psycopg.Connection[Any], since: datetime | None) -> Row:
    """``task_stats`` since ``since`` (default: 7 days ago)."""
    return _scalar(conn, "task_stats", {"since": since})


def callback_profile(conn: psycopg.Connection[Any], task_id: UUID | str,
                     callback_token: str) -> Row:
    """The profile a third party's callback is read with; PT403 for a wrong token."""
    return _scalar(conn, "callback_profile",
                   {"task_id": task_id, "callback_token": callback_token})


def troubled_notifications(conn: psycopg.Connection[Any], state: str | None,
                           limit: int) -> list[Row]:
    """Undelivered alerts and callbacks that failed (``failing``) or were given up
    (``given_up``); both when ``state`` is None. Newest first."""
    return _rows(conn, "troubled_notifications", {"state": state, "limit": limit})


def prune_finished_tasks(conn: psycopg.Connection[Any], older_than_seconds: float,
                         batch_size: int, *, dry_run: bool = False) -> Row:
    """One batch of retention: how many tasks were pruned and how many rows of each kind
    (``task_rows``, ``events``, ``private_rows``, ``schedule_rows``, ``outbox_rows``) went;
    ``rows_kept`` when task rows stay because Supabase Realtime streams them; ``done`` when
    nothing older is left. A dry run counts everything it would delete, changing nothing."""
    rows = _rows(conn, "prune_finished_tasks", {
        "older_than_seconds": older_than_seconds, "batch_size": batch_size, "dry_run": dry_run})
    return rows[0]


async def aprune_finished_tasks(conn: psycopg.AsyncConnection[Any], older_than_seconds: float,
                                batch_size: int) -> Row:
    """``prune_finished_tasks`` for the worker's event loop."""
    return await _arow(conn, "prune_finished_tasks", {
        "older_than_seconds": older_than_seconds, "batch_size": batch_size, "dry_run": False})


def prune_idle_hosts(conn: psycopg.Connection[Any], older_than_seconds: float,
                     batch_size: int, *, dry_run: bool = False) -> Row:
    """One batch of retention for what belongs to no task: how many host rows with
    nothing to keep (``hosts``) and host alerts delivered or given up (``alerts``) went,
    untouched for `older_than_seconds`; ``done`` when nothing older is left. A dry run
    counts everything it would delete, changing nothing."""
    return _rows(conn, "prune_idle_hosts", {
        "older_than_seconds": older_than_seconds, "batch_size": batch_size,
        "dry_run": dry_run})[0]


async def aprune_idle_hosts(conn: psycopg.AsyncConnection[Any], older_than_seconds: float,
                            batch_size: int) -> Row:
    """``prune_idle_hosts`` for the worker's event loop."""
    return await _arow(conn, "prune_idle_hosts", {
        "older_than_seconds": older_than_seconds, "batch_size": batch_size, "dry_run": False})


async def agive_up_stale_notifications(conn: psycopg.AsyncConnection[Any],
                                      older_than_seconds: float, batch_size: int) -> Row:
    """One batch: notifications still undelivered `older_than_seconds` after they were
    enqueued are given up (``given_up``: how many); ``done`` when none is left."""
    return await _arow(conn, "give_up_stale_notifications", {
        "older_than_seconds": older_than_seconds, "batch_size": batch_size})


def tasks_by_status(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {r["status"]: r["n"] for r in _rows(conn, "tasks_by_status")}


def ping(conn: psycopg.Connection[Any]) -> None:
    _scalar(conn, "ping")


def live_demo_tasks(conn: psycopg.Connection[Any]) -> bool:
    """Whether demo tasks are still running."""
    return bool(_scalar(conn, "live_demo_tasks"))


# --- the polling service and the outbox (asyncio) -------------------------------------------


async def listen(conn: psycopg.AsyncConnection[Any]) -> None:
    """Subscribe ``conn`` to the ``taskman`` channel (new tasks and status changes)."""
    await conn.execute(_q("listen"))


async def latest_task_event_id(conn: psycopg.AsyncConnection[Any]) -> int:
    """The id of the newest task event (0 when there is none)."""
    return int(await _ascalar(conn, "latest_task_event_id"))


async def task_changes(conn: psycopg.AsyncConnection[Any], *, after: int,
                       missing: Sequence[int], limit: int) -> list[Row]:
    """Task events with ids above ``after`` (at most ``limit``) or in ``missing``, oldest
    first: ``event_id``, ``task_id``, ``status``, ``user_id`` and ``change`` (whether
    NOTIFY announced it)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_q("task_changes"),
                          {"after": after, "missing": list(missing), "limit": limit})
        return await cur.fetchall()


def _claimed_task_row(cursor: Any) -> RowMaker[ClaimedTask]:
    """Rows as ClaimedTask, made by position once the columns are its fields in order."""
    names = tuple(column.name for column in cursor.description or ())
    if names != ClaimedTask._fields:
        raise RuntimeError(f"claim_admitted_tasks answers {names}, not {ClaimedTask._fields}")
    return ClaimedTask._make


async def claim_admitted_tasks(conn: psycopg.AsyncConnection[Any], worker_id: str,
                               batch_size: int, lease_seconds: int, *, cooldown_seconds: float,
                               max_cooldown_seconds: float,
                               spread_seconds: float) -> list[ClaimedTask]:
    """Claim up to `batch_size` due tasks and admit them to their hosts, in one statement:
    every claimed task in claim order, ``held`` set on those their hosts hold back (they
    are back in the schedule, not to be sent)."""
    async with conn.cursor(row_factory=_claimed_task_row) as cur:
        await cur.execute(_q("claim_admitted_tasks"), {
            "worker_id": worker_id, "batch_size": batch_size, "lease_seconds": lease_seconds,
            "cooldown_seconds": cooldown_seconds, "max_cooldown_seconds": max_cooldown_seconds,
            "spread_seconds": spread_seconds})
        return await cur.fetchall()


async def record_polls(conn: psycopg.AsyncConnection[Any], worker_id: str, results_json: str,
                       host_outcomes: Sequence[Row], *, failure_threshold: int,
                       cooldown_seconds: float, max_cooldown_seconds: float,
                       spread_seconds: float) -> int:
    """Record what a batch of requests says about their hosts, then its poll outcomes (a
    JSON array of PollOutcome, serialised by the caller one by one so that one that
    cannot be written out fails alone), in one statement; failed polls their hosts hold
    back are not recorded. Returns how many outcomes were."""
    return int(await _ascalar(conn, "record_polls", {
        "worker_id": worker_id, "results": results_json,
        "host_outcomes": db.json_arg(list(host_outcomes)),
        "failure_threshold": failure_threshold, "cooldown_seconds": cooldown_seconds,
        "max_cooldown_seconds": max_cooldown_seconds, "spread_seconds": spread_seconds}))


async def record_remote_cancellations(conn: psycopg.AsyncConnection[Any],
                                      outcomes_json: str) -> int:
    """End as cancelled the tasks of a JSON array of ``cancelled`` poll outcomes; returns
    how many were (an outcome whose lease moved on is ignored)."""
    return int(await _ascalar(conn, "record_remote_cancellations", {"results": outcomes_json}))


async def expire_overdue_tasks(conn: psycopg.AsyncConnection[Any]) -> int:
    """Fail every live task past its deadline; returns how many."""
    return int(await _ascalar(conn, "expire_overdue_tasks"))


async def release_tasks(conn: psycopg.AsyncConnection[Any], worker_id: str) -> int:
    """Give back ``worker_id``'s leases; returns how many tasks were released."""
    return int(await _ascalar(conn, "release_tasks", {"worker_id": worker_id}))


async def seconds_until_due(conn: psycopg.AsyncConnection[Any]) -> float | None:
    """Seconds until the next live task falls due (negative if overdue); None if none waits."""
    seconds = await _ascalar(conn, "seconds_until_due")
    return None if seconds is None else float(seconds)


async def listen_outbox(conn: psycopg.AsyncConnection[Any]) -> None:
    """Subscribe ``conn`` to the ``taskman_outbox`` channel (a callback was enqueued)."""
    await conn.execute(_q("listen_outbox"))


async def claim_outbox(conn: psycopg.AsyncConnection[Any], worker_id: str, batch_size: int,
                       lease_seconds: int, *, channel: str | None = None,
                       skip_hosts: Sequence[str] | None = None) -> list[Row]:
    """Lease due notifications, each task's in order: of ``channel`` only (``slack`` or
    ``callback``; None for both), and no callbacks to ``skip_hosts`` (URL authorities)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_q("claim_outbox"), {
            "worker_id": worker_id, "batch_size": batch_size, "lease_seconds": lease_seconds,
            "only_channel": channel,
            "skip_hosts": None if skip_hosts is None else list(skip_hosts)})
        return await cur.fetchall()


async def record_outbox_results(
    conn: psycopg.AsyncConnection[Any],
    results: Sequence[Row],
    *,
    max_attempts: int,
    base_delay_seconds: float,
    max_delay_seconds: float,
) -> list[str]:
    """Write a batch of delivery attempts; returns each row's outcome."""
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(_q("record_outbox_results"), {
            "results": db.json_arg(list(results)), "max_attempts": max_attempts,
            "base_delay_seconds": base_delay_seconds, "max_delay_seconds": max_delay_seconds})
        return await cur.fetchall()


async def release_outbox(conn: psycopg.AsyncConnection[Any], worker_id: str, *,
                         channel: str | None = None) -> int:
    """Give back the notifications (of ``channel`` only, if given) that ``worker_id``
    claimed and did not record: due at once, their delivery ids unchanged. Returns how
    many."""
    return int(await _ascalar(conn, "release_outbox",
                              {"worker_id": worker_id, "only_channel": channel}))


# --- remote hosts ---------------------------------------------------------------------------


async def callback_host_states(conn: psycopg.AsyncConnection[Any]) -> dict[str, bool]:
    """The hosts with an open circuit or a pause, each with whether claims skip it now
    (True: no probe is due)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_q("callback_host_states"))
        return {r["host"]: r["closed_to_claims"] for r in await cur.fetchall()}


async def hold_callbacks(conn: psycopg.AsyncConnection[Any], worker_id: str,
                         callbacks: Sequence[tuple[int, str]], *, cooldown_seconds: float,
                         max_cooldown_seconds: float, take_probes: bool = True) -> set[int]:
    """Of claimed ``(outbox_id, host)`` callbacks, the ids their hosts hold back (given
    back to the outbox, due, no attempt spent); the others may be sent."""
    requests = json.dumps([{"outbox_id": i, "host": h} for i, h in callbacks])
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(_q("hold_callbacks"), {
            "worker_id": worker_id, "requests": requests, "cooldown_seconds": cooldown_seconds,
            "max_cooldown_seconds": max_cooldown_seconds, "take_probes": take_probes})
        return set(await cur.fetchall())


async def callback_secrets_since(conn: psycopg.AsyncConnection[Any],
                                 since: datetime | None) -> tuple[datetime, list[Row]]:
    """The database's clock and the owners' signing secrets rotated after ``since`` (all
    when None): ``user_id``, ``secret``, and ``previous_secret`` with
    ``previous_valid_until`` while the one it replaced still signs."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_q("callback_secrets_since"), {"since": since})
        rows = await cur.fetchall()
    return rows[0]["read_at"], [r for r in rows if r["user_id"] is not None]


async def record_host_outcomes(conn: psycopg.AsyncConnection[Any], worker_id: str,
                               outcomes: Sequence[Row], *, failure_threshold: int,
                               cooldown_seconds: float, max_cooldown_seconds: float,
                               spread_seconds: float) -> set[str]:
    """Record what a batch of polls says about their hosts; returns the task ids of the
    failed polls held back (released to the schedule: not to be recorded)."""
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(_q("record_host_outcomes"), {
            "worker_id": worker_id, "outcomes": db.json_arg(list(outcomes)),
            "failure_threshold": failure_threshold, "cooldown_seconds": cooldown_seconds,
            "max_cooldown_seconds": max_cooldown_seconds, "spread_seconds": spread_seconds})
        return set(await cur.fetchall())


async def set_host_limits(conn: psycopg.AsyncConnection[Any],
                          limits: dict[str, float | None]) -> int:
    """Set hosts' rate limits (requests per second; None removes one); returns how many
    changed."""
    return int(await _ascalar(conn, "set_host_limits", {"limits": db.json_arg(limits)}))


def reset_host(conn: psycopg.Connection[Any], host: str, spread_seconds: float) -> Row | None:
    """Close ``host``'s circuit by hand; its row after, or None for an unknown host."""
    result: Row | None = _scalar(conn, "reset_host", {"host": host,
                                                      "spread_seconds": spread_seconds})
    return result


def host_status(conn: psycopg.Connection[Any]) -> list[Row]:
    """Hosts holding tasks back or failing, with the tasks waiting on each (the caller's)."""
    return list(_scalar(conn, "host_status") or [])


def host_metrics(conn: psycopg.Connection[Any]) -> list[Row]:
    """Every known host's state and counters, for /metrics."""
    return _rows(conn, "host_metrics")


def realtime_mode(conn: psycopg.Connection[Any]) -> str:
    """How Realtime carries task changes: ``changes``, ``broadcast`` or ``none``."""
    mode: str = _scalar(conn, "realtime_mode")
    return mode


def set_realtime_mode(conn: psycopg.Connection[Any], mode: str) -> str:
    """Switch Realtime to ``changes`` or ``broadcast``; the mode now in force."""
    result: str = _scalar(conn, "set_realtime_mode", {"mode": mode})
    return result
