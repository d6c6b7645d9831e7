"""Retention: finished tasks, their history and service-side rows go after the retention
period, live tasks and undelivered notifications never do; while Supabase Realtime streams
taskman.tasks the task rows stay. Host rows with nothing to keep and delivered host
alerts go after the same period."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import create_task, events, schedule_row, task_row
from tests.supabase_realtime import emulate_supabase_realtime
from tests.test_cli import taskman
from tests.worker_harness import worker_settings
from worker.migrate import migrate
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
    assert dry.stdout.startswith("would prune 1 finished tasks: 1 task rows, 3 events, "
                                 "1 private rows, 1 schedule rows, 1 delivered notifications")
    assert {name: _left(conn, task_id) for name, task_id in ids.items()} == before

    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 finished tasks: 1 task rows, 3 events, "
                                  "1 private rows, 1 schedule rows, 1 delivered notifications")
    assert "task rows kept" not in done.stdout
    assert task_row(conn, ids["old"]) is None
    assert _left(conn, ids["old"]) == {"events": 0, "private": 0, "schedule": 0, "outbox": 0}
    # Undelivered notifications keep their task; recent and live tasks are untouched.
    for name in ("undelivered", "recent", "live"):
        assert task_row(conn, ids[name]) is not None
        assert _left(conn, ids[name]) == before[name]

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
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 1
    assert schedule_row(conn, live) is not None and events(conn, live)
    assert asyncio.run(one_round()) == 0


def test_retention_days_zero_keeps_everything(database_url) -> None:
    assert not Retention(worker_settings(database_url, TASKMAN_RETENTION_DAYS="0")).enabled
    assert Retention(worker_settings(database_url)).older_than_seconds == 30 * 86_400


def _stream_tasks_with_realtime(conn) -> None:
    """Make the database look like a Supabase project whose Realtime streams taskman.tasks:
    the `realtime` schema is there and taskman.tasks is in supabase_realtime (changes mode)."""
    emulate_supabase_realtime(conn)
    conn.execute("select taskman.set_realtime_mode('changes')")
    assert conn.execute("select count(*) as n from pg_publication_tables"
                        " where pubname = 'supabase_realtime' and schemaname = 'taskman'"
                        " and tablename = 'tasks'").fetchone()["n"] == 1


def test_while_realtime_streams_tasks_their_rows_stay_and_prune_says_why(
        conn, database_url, decoding) -> None:
    _stream_tasks_with_realtime(conn)
    old = create_task(conn)["task_id"]
    _finish(conn, old, "10 days")
    decoding()  # what came before

    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 finished tasks: 0 task rows, ")
    assert "task rows kept: Supabase Realtime streams taskman.tasks" in done.stdout
    assert _left(conn, old) == {"events": 0, "private": 0, "schedule": 0, "outbox": 0}
    assert task_row(conn, old)["status"] == "completed"
    assert decoding() == []  # nothing of taskman.tasks reached its subscribers


def test_without_realtime_each_pruned_task_is_one_delete_and_nothing_else(
        conn, database_url, decoding) -> None:
    old = [create_task(conn)["task_id"] for _ in range(3)]
    for task_id in old:
        _finish(conn, task_id, "10 days")
    live = create_task(conn)["task_id"]
    decoding()

    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    changes = decoding()
    assert len(changes) == 3 and all(": DELETE: " in c for c in changes)
    deleted = [c.split("task_id[uuid]:")[1].split()[0].strip("'") for c in changes]
    assert sorted(deleted) == sorted(old)
    assert task_row(conn, live) is not None


def test_a_task_another_transaction_holds_is_skipped_then_pruned(conn, database_url) -> None:
    task_id = create_task(conn)["task_id"]
    _finish(conn, task_id, "10 days")
    with psycopg.connect(database_url, autocommit=False) as other:
        # A retry_task or callback in flight holds the row: the batch skips it, no wait.
        other.execute("select 1 from taskman.tasks where task_id = %s for update", (task_id,))
        held = taskman(database_url, "prune", "--older-than", "7d")
        assert held.stdout.startswith("pruned 0 finished tasks")
        assert task_row(conn, task_id) is not None
    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.stdout.startswith("pruned 1 finished tasks: 1 task rows")
    assert task_row(conn, task_id) is None


@pytest.mark.parametrize("lock", ["for update", "for key share"])
def test_a_held_task_between_others_is_pruned_once_released(conn, database_url, lock) -> None:
    # The cursor passes the batch's last task; a task it skipped because another
    # transaction held it (a retry, an event's key check) comes back once released.
    ids = []
    for ended_ago in ("12 days", "11 days", "10 days"):
        ids.append(create_task(conn)["task_id"])
        _finish(conn, ids[-1], ended_ago)
    with psycopg.connect(database_url, autocommit=False) as other:
        other.execute(f"select 1 from taskman.tasks where task_id = %s {lock}", (ids[1],))
        held = taskman(database_url, "prune", "--older-than", "7d")
        assert held.stdout.startswith("pruned 2 finished tasks")
        assert task_row(conn, ids[1]) is not None
    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.stdout.startswith("pruned 1 finished tasks: 1 task rows")
    assert task_row(conn, ids[1]) is None and _left(conn, ids[1]) == dict.fromkeys(
        ("events", "private", "schedule", "outbox"), 0)


def test_upgrade_lists_the_tasks_retention_passed_while_they_were_held(
        server_url, tmp_path) -> None:
    with database_before(server_url, "20261202000900", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            ids = []
            for ended_ago in ("12 days", "11 days", "10 days"):
                ids.append(create_task(conn)["task_id"])
                _finish(conn, ids[-1], ended_ago)
            with psycopg.connect(url, autocommit=False) as other:
                other.execute("select 1 from taskman.tasks where task_id = %s for update",
                              (ids[1],))
                conn.execute("select * from taskman.prune_finished_tasks('7 days')")
            conn.execute("select * from taskman.prune_finished_tasks('7 days')")
            assert task_row(conn, ids[1]) is not None  # passed for good before
        assert [m.version for m in migrate(url)][:1] == ["20261202000900"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            pruned = conn.execute("select * from taskman.prune_finished_tasks('7 days')"
                                  ).fetchone()
            assert (pruned["tasks"], pruned["task_rows"]) == (1, 1)
            assert task_row(conn, ids[1]) is None and _left(conn, ids[1]) == dict.fromkeys(
                ("events", "private", "schedule", "outbox"), 0)
            assert conn.execute("select count(*) as n from taskman_private.retention_deferred"
                                ).fetchone()["n"] == 0


def _host(conn, host: str, touched_ago: str, **state) -> None:
    """A host row with `state` (column values), last changed `touched_ago`."""
    names = ", ".join(["host", *state])
    marks = ", ".join(["%s"] * (1 + len(state)))
    conn.execute(f"insert into taskman_private.hosts ({names}, updated_at)"
                 f" values ({marks}, now() - %s::interval)", [host, *state.values(), touched_ago])


def _alert(conn, host: str, created_ago: str, *, delivered: bool = False,
           given_up: bool = False) -> int:
    """A Slack alert of `host`'s circuit (no task), created `created_ago`."""
    conn.execute("select taskman_private.enqueue_host_alert(%s, 'opened')", (host,))
    return conn.execute(
        "update taskman_private.outbox set created_at = now() - %(ago)s::interval,"
        " delivered_at = case when %(delivered)s then now() - %(ago)s::interval end,"
        " given_up_at = case when %(given_up)s then now() - %(ago)s::interval end"
        " where outbox_id = (select max(outbox_id) from taskman_private.outbox)"
        " returning outbox_id",
        {"ago": created_ago, "delivered": delivered, "given_up": given_up}).fetchone()["outbox_id"]


def _hosts_left(conn) -> set[str]:
    return {r["host"] for r in conn.execute("select host from taskman_private.hosts")}


def _outbox_left(conn) -> set[int]:
    return {r["outbox_id"] for r in conn.execute("select outbox_id from taskman_private.outbox")}


def test_prune_deletes_idle_hosts_with_nothing_to_keep_and_old_finished_alerts(
        conn, database_url) -> None:
    # Made as the worker makes it: a failed poll reported, then the host answering again
    # (the host's row and its owner's, the service's: two idle rows).
    conn.execute("select * from taskman.record_host_outcomes('w1', %s)", (json.dumps(
        [{"host": "https://flaky.example.com:443", "result": "failure", "error": "timeout"},
         {"host": "https://flaky.example.com:443", "result": "success"}]),))
    conn.execute("update taskman_private.hosts set updated_at = now() - interval '10 days'")
    _host(conn, "https://open.example.com:443", "10 days", state="open")
    _host(conn, "https://limited.example.com:443", "10 days", rate_limit=2.0)
    _host(conn, "https://paused.example.com:443", "10 days",
          paused_until="infinity")
    _host(conn, "https://recent.example.com:443", "1 day")
    old_delivered = _alert(conn, "https://open.example.com:443", "10 days", delivered=True)
    old_given_up = _alert(conn, "https://open.example.com:443", "10 days", given_up=True)
    kept_alerts = {_alert(conn, "https://open.example.com:443", "1 day", delivered=True),
                   _alert(conn, "https://open.example.com:443", "1 day", given_up=True),
                   _alert(conn, "https://open.example.com:443", "10 days")}
    # A task's delivered notification is task retention's, with its task.
    task = create_task(conn, callback_url="https://hooks.example.com/a")["task_id"]
    _finish(conn, task, "1 day")
    conn.execute("update taskman_private.outbox set delivered_at = now() - interval '10 days'"
                 " where task_id = %s", (task,))
    hosts, outbox = _hosts_left(conn), _outbox_left(conn)

    dry = taskman(database_url, "prune", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would prune 2 idle hosts and 2 host alerts delivered or given up" in dry.stdout
    assert (_hosts_left(conn), _outbox_left(conn)) == (hosts, outbox)

    done = taskman(database_url, "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert "pruned 2 idle hosts and 2 host alerts delivered or given up" in done.stdout
    assert _hosts_left(conn) == hosts - {"https://flaky.example.com:443",
                                         "https://flaky.example.com:443#service"}
    assert _outbox_left(conn) == outbox - {old_delivered, old_given_up}
    assert kept_alerts <= _outbox_left(conn)

    # Polled again, the host gets a new row.
    conn.execute("select * from taskman.record_host_outcomes('w1', %s)", (json.dumps(
        [{"host": "https://flaky.example.com:443", "result": "failure", "error": "timeout"}]),))
    assert conn.execute("select consecutive_failures from taskman_private.hosts"
                        " where host = 'https://flaky.example.com:443'").fetchone() == {
        "consecutive_failures": 1}


def test_the_workers_retention_job_prunes_idle_hosts_in_batches(conn, database_url) -> None:
    conn.execute("insert into taskman_private.hosts (host, updated_at)"
                 " select 'https://h' || i || '.example.com:443', now() - interval '2 hours'"
                 " from generate_series(1, 450) i")
    _host(conn, "https://busy.example.com:443", "1 minute")
    with psycopg.connect(database_url, autocommit=False) as other:
        # A worker recording a poll of this host holds its row: skipped, no wait.
        other.execute("select 1 from taskman_private.hosts"
                      " where host = 'https://h1.example.com:443' for update")
        retention = Retention(worker_settings(database_url,
                                              TASKMAN_RETENTION_DAYS=str(1 / 24)))

        async def one_round() -> int:
            async with await psycopg.AsyncConnection.connect(database_url,
                                                             autocommit=True) as c:
                return await retention.run_once(c)

        asyncio.run(one_round())  # three batches of at most 200
        assert _hosts_left(conn) == {"https://h1.example.com:443",
                                     "https://busy.example.com:443"}
    asyncio.run(one_round())
    assert _hosts_left(conn) == {"https://busy.example.com:443"}


def test_prune_idle_hosts_refuses_bad_arguments_and_changes_nothing(conn) -> None:
    _host(conn, "https://old.example.com:443", "10 days")
    for call in ("select * from taskman.prune_idle_hosts(interval '-1 day')",
                 "select * from taskman.prune_idle_hosts(null)",
                 "select * from taskman.prune_idle_hosts(interval '1 day', 0)"):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(call)
    assert _hosts_left(conn) == {"https://old.example.com:443"}


def test_upgrade_prunes_hosts_and_alerts_a_deployed_database_already_has(
        server_url, tmp_path) -> None:
    with database_before(server_url, "20261202000100", tmp_path) as url, \
            psycopg.connect(url, autocommit=True, row_factory=dict_row) as old:
        old.execute("select * from taskman.record_host_outcomes('w1', %s, 1)", (json.dumps(
            [{"host": "https://down.example.com:443", "result": "failure",
              "error": "timeout"}]),))  # opens the circuit: an alert with no task
        old.execute("select * from taskman.record_host_outcomes('w1', %s, 1)", (json.dumps(
            [{"host": "https://gone.example.com:443", "result": "failure", "error": "timeout"},
             {"host": "https://gone.example.com:443", "result": "success"}]),))
        old.execute("update taskman_private.hosts set updated_at = now() - interval '40 days'")
        old.execute("update taskman_private.outbox set delivered_at = now() - interval '40 days'")
        migrate(url)
        done = taskman(url, "prune", "--older-than", "30d")
        assert done.returncode == 0, done.stderr
        assert "pruned 1 idle hosts and 1 host alerts delivered or given up" in done.stdout
        assert _hosts_left(old) == {"https://down.example.com:443"}  # still open
        assert _outbox_left(old) == set()
