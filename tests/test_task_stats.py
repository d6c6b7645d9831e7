"""task_stats from rollups: the same figures as counting every task of the period (in whole
hours; durations from buckets), for every way a task ends or comes back, for the caller's
tasks only, kept when retention deletes the tasks, and upgraded with the history in it."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import USER_A, USER_B, create_task, set_status
from worker.migrate import migrate

# The figures as task_stats computed them by reading every task of the period (exact),
# for every task (a superuser's view).
EXACT = """
with scoped as (
  select t.status, t.created_at, t.completed_at from taskman.tasks t
  where t.created_at >= %(since)s::timestamptz
)
select jsonb_build_object(
  'total', (select count(*) from scoped),
  'by_status', (select jsonb_object_agg(s.status, (select count(*) from scoped c
                                                   where c.status = s.status))
                from unnest(array['pending', 'in_progress', 'completed', 'failed',
                                  'cancelled']) s(status)),
  'success_rate', (select round(count(*) filter (where status = 'completed')::numeric
                                / nullif(count(*) filter (where status in ('completed', 'failed')),
                                         0), 4) from scoped),
  'daily', (select coalesce(jsonb_agg(jsonb_build_object('day', d.day, 'completed', d.completed,
                                                         'failed', d.failed) order by d.day), '[]')
            from (select (completed_at at time zone 'UTC')::date as day,
                         count(*) filter (where status = 'completed') as completed,
                         count(*) filter (where status = 'failed') as failed
                  from scoped where status in ('completed', 'failed') group by 1) d),
  'median', (select percentile_cont(0.5) within group (order by
               extract(epoch from completed_at - created_at)) from scoped
             where status = 'completed'),
  'p95', (select percentile_cont(0.95) within group (order by
            extract(epoch from completed_at - created_at)) from scoped
          where status = 'completed')) as r
"""


def _stats(conn: psycopg.Connection, since: Any = None) -> dict[str, Any]:
    if since is None:
        return conn.execute("select taskman.task_stats() as r").fetchone()["r"]
    return conn.execute("select taskman.task_stats(%s) as r", (since,)).fetchone()["r"]


def _exact(conn: psycopg.Connection, since: str) -> dict[str, Any]:
    return conn.execute(EXACT, {"since": since}).fetchone()["r"]


def _assert_matches_exact(conn: psycopg.Connection, since: Any = None) -> dict[str, Any]:
    """task_stats equals the exact figures from its period's start; durations within 9%."""
    stats = _stats(conn, since)
    exact = _exact(conn, stats["since"])
    for key in ("total", "by_status", "daily"):
        assert stats[key] == exact[key], key
    assert stats["success_rate"] == (None if exact["success_rate"] is None
                                     else pytest.approx(float(exact["success_rate"])))
    for key in ("median", "p95"):
        got, want = stats["duration_seconds"][key], exact[key]
        assert (got is None) == (want is None), key
        if want is not None:
            assert abs(got - want) <= 0.0905 * want + 0.000001, (key, got, want)
    return stats


def _claim(conn: psycopg.Connection, worker: str, batch: int = 100) -> list[str]:
    return [str(r["task_id"]) for r in conn.execute(
        "select task_id from taskman.claim_due_tasks(%s, %s, 60)", (worker, batch))]


def _record(conn: psycopg.Connection, worker: str, ids: list[str], status: str) -> None:
    conn.execute("select * from taskman.record_poll_results(%s)", (json.dumps([
        {"task_id": i, "worker_id": worker, "ok": True, "status": status} for i in ids]),))


def _age(conn: psycopg.Connection, task_id: str, created_ago: str) -> None:
    """Move a live task's creation back by `created_ago` (as if it had been running)."""
    with conn.transaction():
        conn.execute("set local taskman.poll_writer = 'on'")
        conn.execute("update taskman.tasks set created_at = now() - %s::interval"
                     " where task_id = %s", (created_ago, task_id))


def test_counts_follow_create_start_complete_fail_cancel_and_retry(conn) -> None:
    ids = [create_task(conn)["task_id"] for _ in range(6)]
    assert _assert_matches_exact(conn)["by_status"]["pending"] == 6
    set_status(conn, ids[0], "in_progress")
    set_status(conn, ids[1], "completed")
    set_status(conn, ids[2], "failed")
    conn.execute("select taskman.cancel_task(%s)", (ids[3],))
    set_status(conn, ids[4], "in_progress")
    set_status(conn, ids[4], "completed")
    stats = _assert_matches_exact(conn)
    assert stats["by_status"] == {"pending": 1, "in_progress": 1, "completed": 2, "failed": 1,
                                  "cancelled": 1}
    assert stats["total"] == 6 and stats["success_rate"] == 0.6667
    conn.execute("select taskman.retry_task(%s)", (ids[2],))
    conn.execute("select taskman.retry_task(%s)", (ids[3],))
    stats = _assert_matches_exact(conn)
    assert stats["by_status"] == {"pending": 3, "in_progress": 1, "completed": 2, "failed": 0,
                                  "cancelled": 0}
    assert stats["success_rate"] == 1
    set_status(conn, ids[2], "completed")  # ends again: counted once, as it is now
    stats = _assert_matches_exact(conn)
    assert stats["by_status"]["completed"] == 3 and stats["total"] == 6
    assert stats["daily"] == [{"day": str(datetime.now(UTC).date()), "completed": 3,
                               "failed": 0}]


def test_a_batch_of_results_writes_one_row_per_key(conn) -> None:
    ids = [create_task(conn, poll_url=f"https://api.example.com/{i}")["task_id"]
           for i in range(60)]
    for task_id in ids:
        _age(conn, task_id, "10 minutes")  # all in one duration bucket
    claimed = _claim(conn, "w1")
    assert sorted(claimed) == sorted(ids)
    _record(conn, "w1", claimed[:40], "completed")
    _record(conn, "w1", claimed[40:], "failed")
    stats = _assert_matches_exact(conn)
    assert (stats["by_status"]["completed"], stats["by_status"]["failed"]) == (40, 20)
    rows = conn.execute("select everyone, count(*) as n, sum(tasks) as tasks"
                        " from taskman_private.finished_task_counts group by everyone"
                        " order by everyone").fetchall()
    # For the owner and for everyone: completed (one duration bucket) and failed.
    assert [(r["n"], r["tasks"]) for r in rows] == [(2, 60), (2, 60)]


def test_a_metadata_edit_of_a_finished_task_counts_nothing(api, conn) -> None:
    task = api.rpc("authenticated", "create_task", USER_A)
    set_status(conn, task["task_id"], "completed")
    before = conn.execute("select * from taskman_private.finished_task_counts").fetchall()
    with api.request("authenticated", USER_A) as cur:
        cur.execute("update taskman.tasks set metadata = '{\"k\": 1}'")
    assert conn.execute("select * from taskman_private.finished_task_counts"
                        ).fetchall() == before
    assert _assert_matches_exact(conn)["by_status"]["completed"] == 1


def test_durations_come_from_buckets_within_nine_percent(conn) -> None:
    ago = ["0 seconds", "2 seconds", "45 seconds", "3 minutes", "20 minutes", "50 minutes"]
    for i in range(60):
        task_id = create_task(conn)["task_id"]
        _age(conn, task_id, f"{ago[i % len(ago)]}")
        if i % 6 != 5:
            set_status(conn, task_id, "completed")
    stats = _assert_matches_exact(conn, datetime.now(UTC) - timedelta(hours=2))
    assert 41 < stats["duration_seconds"]["median"] < 49  # 45 seconds
    assert stats["duration_seconds"]["p95"] > 1000


def test_the_period_starts_at_the_hour_of_since(conn) -> None:
    now = conn.execute("select now() as t").fetchone()["t"]
    hour = now.replace(minute=0, second=0, microsecond=0)
    early = create_task(conn)["task_id"]
    _age(conn, early, f"{(now - hour).total_seconds() / 2} seconds")  # this hour, earlier
    set_status(conn, early, "completed")
    create_task(conn)
    stats = _assert_matches_exact(conn, now - timedelta(seconds=0.1))
    assert datetime.fromisoformat(stats["since"]) == hour
    assert stats["total"] == 2  # the hour is counted whole
    assert _stats(conn, hour + timedelta(hours=1))["total"] == 0
    assert _stats(conn, "-infinity")["total"] == 2


@pytest.mark.parametrize("since", [None, "infinity"])
def test_a_since_that_is_no_time_is_refused_naming_it(api, since) -> None:
    for role, sub in (("service_role", None), ("authenticated", USER_A)):
        with pytest.raises(psycopg.Error) as err, api.request(role, sub) as cur:
            cur.execute("select taskman.task_stats(%s::timestamptz)", (since,))
        assert err.value.sqlstate == "22023" and "since" in str(err.value)


def test_a_user_sees_only_their_own_figures(api, conn) -> None:
    mine = [api.rpc("authenticated", "create_task", USER_A)["task_id"] for _ in range(2)]
    theirs = [api.rpc("authenticated", "create_task", USER_B)["task_id"] for _ in range(3)]
    create_task(conn)  # the service's own
    set_status(conn, mine[0], "completed")
    for task_id in theirs:
        set_status(conn, task_id, "failed")
    a = api.rpc("authenticated", "task_stats", USER_A)
    b = api.rpc("authenticated", "task_stats", USER_B)
    service = api.rpc("service_role", "task_stats")
    assert (a["total"], a["by_status"]["completed"], a["by_status"]["failed"]) == (2, 1, 0)
    assert (b["total"], b["by_status"]["failed"], b["success_rate"]) == (3, 3, 0)
    assert service["total"] == 6
    nobody = api.rpc("authenticated", "task_stats", "cccccccc-0000-4000-8000-000000000003")
    assert nobody["total"] == 0 and nobody["daily"] == []
    # The counts themselves are the service's only: a user cannot read them, nor the
    # private function's figures for someone else.
    for role, sub in (("authenticated", USER_A), ("anon", None)):
        with pytest.raises(psycopg.Error) as err, api.request(role, sub) as cur:
            cur.execute("select * from taskman_private.finished_task_counts")
        assert err.value.sqlstate == "42501"
    with api.request("authenticated", USER_A) as cur:
        cur.execute("select set_config('request.jwt.claims', %s, true)",
                    (json.dumps({"sub": USER_A, "role": "service_role"}),))
        forged = cur.execute("select taskman.task_stats() as r").fetchone()["r"]
    assert forged["total"] == 2


def test_stats_keep_the_tasks_retention_deleted(conn) -> None:
    ids = [create_task(conn)["task_id"] for _ in range(3)]
    set_status(conn, ids[0], "completed")
    set_status(conn, ids[1], "cancelled")
    before = _stats(conn)
    pruned = conn.execute("select * from taskman.prune_finished_tasks('0 seconds')").fetchone()
    assert (pruned["tasks"], pruned["task_rows"]) == (2, 2)
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 1
    assert _stats(conn) == before


def test_the_sweep_counts_each_expired_task_once(conn) -> None:
    overdue = create_task(conn)["task_id"]
    silent = create_task(conn, heartbeat_seconds=60)["task_id"]
    set_status(conn, silent, "in_progress")
    with conn.transaction():
        conn.execute("set local taskman.poll_writer = 'on'")
        conn.execute("update taskman.tasks set deadline_at = now() - interval '1 second'"
                     " where task_id = %s", (overdue,))
        conn.execute("update taskman.tasks set started_at = now() - interval '2 minutes',"
                     " updated_at = now() - interval '2 minutes' where task_id = %s", (silent,))
        conn.execute("update taskman_private.task_schedule set alive_at = null"
                     " where task_id = %s", (silent,))
    assert conn.execute("select taskman.expire_overdue_tasks() as n").fetchone()["n"] == 2
    assert _assert_matches_exact(conn)["by_status"]["failed"] == 2


def test_concurrent_workers_finishing_one_owners_tasks_count_every_task(
        conn, database_url) -> None:
    for i in range(400):
        create_task(conn, poll_url=f"https://api.example.com/{i}")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as own:
                barrier.wait()
                while ids := _claim(own, worker, 10):
                    _record(own, worker, ids, "completed" if worker != "w3" else "failed")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = _assert_matches_exact(conn)
    assert stats["by_status"]["completed"] + stats["by_status"]["failed"] == 400


def test_upgrade_counts_the_history_already_there(server_url, tmp_path) -> None:
    with database_before(server_url, "20261208001000", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            for i in range(30):
                task_id = create_task(conn, poll_url=f"https://api.example.com/{i}")["task_id"]
                _age(conn, task_id, f"{i * 7} hours")  # over nine days
                if i % 5 != 4:
                    set_status(conn, task_id, ("completed", "failed", "cancelled")[i % 3])
                    conn.execute("update taskman.tasks set completed_at = created_at"
                                 " + %s::interval where task_id = %s", (f"{i} minutes", task_id))
            conn.execute("update taskman.tasks set user_id = %s where created_at < now()"
                         " - interval '3 days'", (USER_A,))
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            stats = _assert_matches_exact(conn, "-infinity")
            assert stats["total"] == 30 and len(stats["daily"]) >= 8
            week = _assert_matches_exact(conn)
            assert 0 < week["total"] < 30
            create_task(conn)
            assert _assert_matches_exact(conn)["total"] == week["total"] + 1
            owned = conn.execute("select count(*) as n from taskman.tasks where user_id = %s",
                                 (USER_A,)).fetchone()["n"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("set role authenticated")
            conn.execute("select set_config('request.jwt.claims', %s, false)",
                         (json.dumps({"sub": USER_A}),))
            assert _stats(conn, "-infinity")["total"] == owned
