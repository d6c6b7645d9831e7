"""Start times, priority and heartbeats: when a task is first touched, which due task goes
first, and how a silent remote is found before the deadline."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
import pytest

from tests.factories import create_task, make_due, schedule_row, task_row
from tests.missing_tools import missing
from tests.remote_api import Reply
from tests.worker_harness import running_worker, wait_until


def claim(conn: psycopg.Connection, batch: int) -> set[str]:
    rows = conn.execute("select task_id from taskman.claim_due_tasks('w-test', %s, 60)",
                        (batch,)).fetchall()
    return {str(r["task_id"]) for r in rows}


def now(conn: psycopg.Connection):
    return conn.execute("select now() as t").fetchone()["t"]


def test_higher_priority_goes_first_among_due_tasks_then_due_order(conn) -> None:
    low = [create_task(conn, poll_url=f"https://api.example.com/{i}")["task_id"]
           for i in range(3)]
    for i, task_id in enumerate(low):
        make_due(conn, task_id, f"-{10 - i} seconds")  # low[0] is due longest
    high = create_task(conn, priority=7)["task_id"]
    later_high = create_task(conn, priority=100)["task_id"]
    make_due(conn, later_high, "1 hour")  # not due yet: it does not jump the queue
    negative = create_task(conn, priority=-3)["task_id"]
    make_due(conn, negative, "-1 hour")  # due longest of all, but lowest priority

    assert claim(conn, 1) == {high}
    assert claim(conn, 1) == {low[0]}
    assert claim(conn, 5) == {low[1], low[2], negative}
    assert claim(conn, 5) == set()
    # The service may change a priority later; the claim follows it.
    make_due(conn, low[2], "-1 second")
    make_due(conn, negative, "-1 second")
    conn.execute("update taskman.tasks set priority = 50 where task_id = %s", (negative,))
    assert claim(conn, 1) == {negative}
    assert task_row(conn, high)["priority"] == 7 and task_row(conn, low[0])["priority"] == 0


def _claim_plans(conn: psycopg.Connection) -> list[str]:
    """The plans of the statements run inside one claim, from auto_explain."""
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    with conn.transaction(force_rollback=True):
        conn.execute("load 'auto_explain'")
        conn.execute("set local auto_explain.log_min_duration = 0")
        conn.execute("set local auto_explain.log_nested_statements = on")
        conn.execute("set local client_min_messages = log")
        conn.execute("select count(*) from taskman.claim_due_tasks('w-plan', 50, 60)")
    return [p for p in plans if "task_schedule" in p]


def test_the_claim_is_one_index_walk_whatever_the_history_and_the_future(conn) -> None:
    conn.execute("set session_replication_role = replica")  # bulk load, as bench.claim does
    conn.execute("""
        insert into taskman.tasks (task_id, status, task_type, poll_url, poll_method, poll_config,
          poll_interval_seconds, attempt_count, error_count, max_attempts, timeout_minutes,
          deadline_at, metadata, created_at, updated_at, completed_at, priority)
        select gen_random_uuid(), case when i <= 30000 then 'completed' else 'pending' end,
          'generic', 'https://api.example.com/' || i, 'GET', '{}', 30, 0, 0, 10, 120,
          now() + interval '1 hour', '{}', now(), now(),
          case when i <= 30000 then now() end, (i % 3) - 1
        from generate_series(1, 40000) i""")
    conn.execute("""
        insert into taskman_private.task_schedule (task_id, next_poll_at, priority)
        select t.task_id, case when t.status = 'completed' then null
                               when random() < 0.01 then now() - interval '1 minute'
                               else now() + interval '1 hour' end, t.priority
        from taskman.tasks t""")
    conn.execute("set session_replication_role = origin")
    conn.execute("analyze taskman.tasks")
    conn.execute("analyze taskman_private.task_schedule")
    plans = _claim_plans(conn)
    if not plans:
        missing("auto_explain is not available on this server")
    claim_plan = next(p for p in plans if "Recursive Union" in p)
    # Finding the due tasks (the priority levels, then each level's due tasks): scans of
    # the one index, bounded by the due time, so neither history nor tasks due later
    # are read; nothing is read whole.
    finding = claim_plan.split("CTE levels")[1].split("CTE owners_after")[0]
    scans = [line for line in finding.splitlines() if "Index" in line and "Scan" in line]
    assert len(scans) >= 3, finding
    assert all("task_schedule_priority_due_idx" in line for line in scans), finding
    assert "Seq Scan" not in finding, finding
    level_scan = finding.split("CTE longest_due")[1]
    assert "(priority = l_1.priority) AND (next_poll_at <= now())" in level_scan, finding
    # The owners looked up (when the window is crowded): one probe each on their index.
    owners = claim_plan.split("CTE owners_after")[1].split("CTE looked_up")[0]
    scans = [line for line in owners.splitlines() if "Index" in line and "Scan" in line]
    assert scans and all("task_schedule_owner_due_idx" in line for line in scans), owners
    assert "Seq Scan" not in owners, owners
    # The looked-up owners' tasks are locked by key.
    heads = claim_plan.split("CTE heads")[1].split("CTE due")[0]
    assert "task_schedule_pkey" in heads and "Seq Scan" not in heads, heads


def test_start_at_delays_the_first_poll_and_the_submit_and_moves_the_deadline(
        conn, database_url, remote) -> None:
    poll_url = remote.script("/later", Reply(json={"status": "done"}))
    submit_url = remote.script("/start", Reply(200, json={"status": "done"}))
    starts = now(conn) + timedelta(seconds=2)
    polled = create_task(conn, poll_url=poll_url, start_at=starts.isoformat(),
                         timeout_minutes=10)
    submitted = create_task(conn, poll_url=None, submit_url=submit_url, start_at=starts)
    asap = create_task(conn, poll_url=remote.script("/asap", Reply(json={"status": "done"})),
                       start_at=(now(conn) - timedelta(days=1)).isoformat())
    assert task_row(conn, polled["task_id"])["deadline_at"] == starts + timedelta(minutes=10)
    created = time.monotonic()
    with running_worker(database_url):
        wait_until(lambda: task_row(conn, asap["task_id"])["status"] == "completed")
        assert remote.hits("/later") == [] and remote.hits("/start") == []
        wait_until(lambda: task_row(conn, polled["task_id"])["status"] == "completed")
        wait_until(lambda: task_row(conn, submitted["task_id"])["status"] == "completed")
    assert remote.hits("/later")[0].at - created >= 1.8
    assert remote.hits("/start")[0].at - created >= 1.8


@pytest.mark.parametrize(("args", "field"), [
    ({"priority": 101}, "priority"),
    ({"priority": -101}, "priority"),
    ({"heartbeat_seconds": 0}, "heartbeat_seconds"),
    ({"heartbeat_seconds": 604801}, "heartbeat_seconds"),
    # Shorter than the poll interval: the task would die between two good polls.
    ({"heartbeat_seconds": 5, "poll_interval_seconds": 10}, "heartbeat_seconds"),
    ({"start_at": "2999-01-01T00:00:00Z"}, "start_at"),
])
def test_out_of_range_scheduling_input_is_refused_naming_the_field(conn, args, field) -> None:
    before = conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"]
    with pytest.raises(psycopg.Error) as refused:
        create_task(conn, **args)
    assert refused.value.sqlstate == "22023" and field in refused.value.diag.message_primary
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == before


def sweep(conn: psycopg.Connection) -> int:
    return conn.execute("select taskman.expire_overdue_tasks() as n").fetchone()["n"]


def test_a_silent_started_task_fails_with_heartbeat_timeout_and_callbacks_reset_it(conn) -> None:
    silent = create_task(conn, poll_url=None, heartbeat_seconds=1)["task_id"]
    chatty = create_task(conn, poll_url=None, heartbeat_seconds=2)["task_id"]
    waiting = create_task(conn, poll_url=None, heartbeat_seconds=1)["task_id"]  # not started
    token = create_task(conn, poll_url=None, heartbeat_seconds=2)
    for task_id in (silent, chatty, token["task_id"]):
        conn.execute("select taskman.update_task(%s, 'in_progress')", (task_id,))
    time.sleep(1.3)
    # The same report again changes nothing visible, but is a sign of life.
    conn.execute("select taskman.update_task(%s, 'in_progress')", (chatty,))
    conn.execute("select taskman.update_task(%s, callback_token => %s)",
                 (token["task_id"], token["callback_token"]))
    assert sweep(conn) == 1
    row = task_row(conn, silent)
    assert (row["status"], row["error_code"]) == ("failed", "heartbeat_timeout")
    assert "sign of life" in row["error_message"]
    time.sleep(1.0)
    assert sweep(conn) == 0  # 2.3 s after start, 1.0 s after their last report
    time.sleep(1.2)
    assert sweep(conn) == 2
    assert {task_row(conn, t)["error_code"] for t in (chatty, token["task_id"])} == {
        "heartbeat_timeout"}
    assert task_row(conn, waiting)["status"] == "pending"


def test_polls_that_work_keep_a_heartbeat_alive_quietly_and_failing_ones_do_not(
        conn, database_url, remote) -> None:
    url = remote.script("/beat", Reply(json={"status": "running"}))
    task_id = create_task(conn, poll_url=url, poll_interval_seconds=1, heartbeat_seconds=2,
                          max_attempts=1000)["task_id"]
    with running_worker(database_url):
        wait_until(lambda: task_row(conn, task_id)["status"] == "in_progress")
        written = task_row(conn, task_id)["updated_at"]
        time.sleep(3.5)
        sweep(conn)
        assert task_row(conn, task_id)["status"] == "in_progress"
        assert task_row(conn, task_id)["updated_at"] == written  # the polls wrote no row
        assert schedule_row(conn, task_id)["alive_at"] > written
        remote.stop()  # every poll fails from now on: no sign of life
        row = wait_until(lambda: (r := task_row(conn, task_id))["status"] == "failed" and r,
                         timeout=20)
    assert row["error_code"] == "heartbeat_timeout"
