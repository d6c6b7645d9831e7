"""create_task writes a task and its rows itself; a plain INSERT goes through the row
triggers. Both follow one set of rules and leave the same rows."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import USER_A, create_task, events
from worker.migrate import migrate

# Columns that differ between any two tasks (their identity and clock).
_OWN = {"task_id", "created_at", "updated_at", "deadline_at", "next_poll_at"}

_SHAPES = {
    "polled with headers": {
        "poll_url": "https://api.example.com/status/1",
        "poll_method": "post",
        "poll_headers": {"Authorization": "Bearer remote-secret"},
        "poll_body": {"job": 7},
        "poll_config": {"status_path": "state"},
        "callback_url": "https://hooks.example.com/done",
        "callback_headers": {"X-Receiver-Key": "receiver-secret"},
        "metadata": {"workflow": "nightly"},
        "max_attempts": 3,
        "priority": 5,
    },
    "submitted with a callback placeholder": {
        "submit_url": "https://jobs.example.com/run",
        "submit_body": {"notify": "{callback_url}"},
        "submit_headers": {"Authorization": "Bearer submit-secret"},
        "heartbeat_seconds": 120,
    },
    "waiting for a callback": {"task_type": "webhook", "timeout_minutes": 30},
}


def _rows(conn: psycopg.Connection, task_id: str) -> dict[str, Any]:
    """Everything Taskman stores for a task, without what differs between any two."""
    task = conn.execute("select * from taskman.tasks where task_id = %s", (task_id,)).fetchone()
    schedule = conn.execute("select * from taskman_private.task_schedule where task_id = %s",
                            (task_id,)).fetchone()
    private = conn.execute(
        "select poll_headers, submit_headers, callback_headers,"
        " callback_token_hash is not null as has_token,"
        " submit_callback_token is not null as hands_token_to_submit"
        " from taskman_private.task_private where task_id = %s", (task_id,)).fetchone()
    return {
        "task": {k: v for k, v in task.items() if k not in _OWN},
        "schedule": {k: v for k, v in schedule.items() if k not in _OWN},
        "private": private,
        "events": [(e["event_type"], e["from_status"], e["to_status"], e["detail"], e["user_id"])
                   for e in events(conn, task_id)],
    }


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_create_task_and_a_plain_insert_store_the_same_task(api, conn, shape) -> None:
    fields = _SHAPES[shape]
    args = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    created = api.rpc("authenticated", "create_task", USER_A, **args)
    with api.request("authenticated", USER_A) as cur:
        columns = ", ".join(fields)
        cur.execute(f"insert into taskman.tasks ({columns})"
                    f" values ({', '.join(['%s'] * len(fields))}) returning task_id",
                    list(args.values()))
        inserted = str(cur.fetchone()["task_id"])

    by_create, by_insert = _rows(conn, created["task_id"]), _rows(conn, inserted)
    # create_task hands every task a callback token (a plain INSERT's task gets one from
    # issue_callback_token, or at once when its submit needs one), so it always makes
    # a private row.
    assert by_create["private"].pop("has_token") and created["callback_token"]
    if by_insert["private"] is None:
        assert by_create["private"] == {"poll_headers": None, "submit_headers": None,
                                        "callback_headers": None, "hands_token_to_submit": False}
        by_create["private"] = None
    else:
        by_insert["private"].pop("has_token")
    assert by_create == by_insert
    assert str(by_create["task"]["user_id"]) == USER_A and by_create["task"]["status"] == "pending"


def test_create_task_keeps_the_headers_service_side_only(api, conn) -> None:
    created = api.rpc("authenticated", "create_task", USER_A,
                      **{k: json.dumps(v) if isinstance(v, dict) else v
                         for k, v in _SHAPES["polled with headers"].items()})
    row = conn.execute("select poll_headers, submit_headers, callback_headers"
                       " from taskman.tasks where task_id = %s", (created["task_id"],)).fetchone()
    assert row == {"poll_headers": None, "submit_headers": None, "callback_headers": None}
    assert "remote-secret" not in json.dumps(created)
    assert conn.execute("select count(*) as n from taskman_private.poll_headers_in_flight"
                        ).fetchone()["n"] == 0


def test_a_client_that_turns_on_the_creators_setting_is_refused(api, conn) -> None:
    # A whole row, as the rules would never let a client write it: without the policy,
    # the setting alone would store it.
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            api.request("authenticated", USER_A) as cur:
        cur.execute("select set_config('taskman.task_creator', 'on', true)")
        cur.execute(
            "insert into taskman.tasks (task_id, user_id, status, task_type, poll_url,"
            " poll_method, poll_config, poll_interval_seconds, attempt_count, error_count,"
            " max_attempts, timeout_minutes, deadline_at, metadata, created_at, updated_at,"
            " priority, result)"
            " values (gen_random_uuid(), %s, 'completed', 'generic', 'http://169.254.169.254/',"
            " 'GET', '{}', 30, 0, 0, 10, 120, now(), '{}', now(), now(), 0, '{\"ok\": true}')",
            (USER_A,))
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 0


def test_an_insert_after_create_task_in_one_transaction_goes_through_the_rules(conn) -> None:
    with conn.transaction():
        create_task(conn)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("insert into taskman.tasks (poll_url, status)"
                         " values ('https://api.example.com/status/2', 'completed')")
    with conn.transaction():
        create_task(conn)
        inserted = conn.execute("insert into taskman.tasks (poll_url)"
                                " values ('https://api.example.com/status/3')"
                                " returning task_id").fetchone()["task_id"]
    assert [e["event_type"] for e in events(conn, inserted)] == ["created"]
    assert conn.execute("select host from taskman_private.task_schedule where task_id = %s",
                        (inserted,)).fetchone() == {"host": "https://api.example.com:443"}


def test_deleting_tasks_deletes_their_service_side_rows(conn) -> None:
    ids = [create_task(conn, poll_headers={"Authorization": f"Bearer {i}"})["task_id"]
           for i in range(3)]
    conn.execute("insert into taskman_private.retention_deferred (task_id)"
                 " select unnest(%s::uuid[])", (ids[1:],))
    conn.execute("delete from taskman.tasks where task_id = any(%s::uuid[])", (ids[:2],))
    for table in ("taskman_private.task_schedule", "taskman_private.task_private",
                  "taskman_private.retention_deferred"):
        left = conn.execute(f"select task_id::text from {table} order by 1").fetchall()
        assert left == [{"task_id": ids[2]}], table


_POLL_OUTCOMES = {
    # Holds the task's schedule row and writes its raw error, a poll event and a retry.
    "a failed poll": {"ok": False, "error_code": "poll_error", "http_status": 503,
                      "raw_error": "upstream unavailable", "reason": "http_503"},
    # Holds the task row too, and writes the result, the raw answer and the transition.
    "the last poll": {"ok": True, "status": "completed", "http_status": 200,
                      "raw_response": '{"state": "done"}', "result": {"state": "done"}},
}


def _service_side_rows(conn: psycopg.Connection, task_id: str) -> dict[str, int]:
    return {table: conn.execute(f"select count(*) as n from {table} where task_id = %s",
                                (task_id,)).fetchone()["n"]
            for table in ("taskman.tasks", "taskman.task_events", "taskman_private.task_schedule",
                          "taskman_private.task_private")}


@pytest.mark.parametrize("outcome", sorted(_POLL_OUTCOMES))
def test_a_task_deleted_while_its_poll_is_recorded_leaves_none_of_its_rows(
        conn, database_url, outcome) -> None:
    # The schedule and private rows have no foreign key: a delete must still not leave
    # behind what a poll recorded at the same moment.
    task_id = create_task(conn)["task_id"]
    assert conn.execute("select task_id::text from taskman.claim_due_tasks('w1', 1, 60)"
                        ).fetchall() == [{"task_id": task_id}]
    failures: list[BaseException] = []

    def delete() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as deleter:
                deleter.execute("select set_config('application_name', 'deleter', false)")
                deleter.execute("delete from taskman.tasks where task_id = %s", (task_id,))
        except BaseException as exc:  # reported by the test's thread below
            failures.append(exc)

    with psycopg.connect(database_url) as recorder:
        recorded = recorder.execute(
            "select count(*) from taskman.record_poll_results(%s)",
            (json.dumps([{"task_id": task_id, "worker_id": "w1",
                          **_POLL_OUTCOMES[outcome]}]),)).fetchone()
        assert recorded == (1,)
        deleter = threading.Thread(target=delete)
        deleter.start()
        waited = 0.0
        while not conn.execute("select exists (select 1 from pg_stat_activity"
                               " where application_name = 'deleter'"
                               " and wait_event_type = 'Lock') as waits").fetchone()["waits"]:
            assert waited < 10, "the delete did not wait for the poll being recorded"
            time.sleep(0.02)
            waited += 0.02
        recorder.commit()
    deleter.join(10)
    assert not deleter.is_alive() and not failures
    assert _service_side_rows(conn, task_id) == dict.fromkeys(
        ("taskman.tasks", "taskman.task_events", "taskman_private.task_schedule",
         "taskman_private.task_private"), 0)


def test_upgrading_keeps_the_tasks_rows_and_their_deletes(server_url, tmp_path) -> None:
    with database_before(server_url, "20261202000800", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            before = create_task(conn, poll_headers={"Authorization": "Bearer before"})
        assert [m.version for m in migrate(url)][:1] == ["20261202000800"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            after = create_task(conn, poll_headers={"Authorization": "Bearer after"})
            claimed = conn.execute("select poll_url, poll_headers"
                                   " from taskman.claim_due_tasks('w1', 10, 60)").fetchall()
            assert sorted(c["poll_headers"]["Authorization"] for c in claimed) == [
                "Bearer after", "Bearer before"]
            conn.execute("delete from taskman.tasks where task_id = %s", (before["task_id"],))
            for table in ("taskman_private.task_schedule", "taskman_private.task_private"):
                left = conn.execute(f"select task_id::text from {table}").fetchall()
                assert left == [{"task_id": after["task_id"]}], table
