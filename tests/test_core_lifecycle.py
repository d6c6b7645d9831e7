"""The task lifecycle is enforced by the database itself."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import USER_A, USER_B, create_task, events, set_status, task_row
from worker.migrate import migrate

LEGAL = [
    ("pending", "in_progress"),
    ("pending", "completed"),
    ("pending", "failed"),
    ("pending", "cancelled"),
    ("in_progress", "completed"),
    ("in_progress", "failed"),
    ("in_progress", "cancelled"),
]
STATUSES = ["pending", "in_progress", "completed", "failed", "cancelled"]
ILLEGAL = [(a, b) for a in STATUSES for b in STATUSES if a != b and (a, b) not in LEGAL]


def _task_in(conn: psycopg.Connection, status: str) -> str:
    task_id = create_task(conn)["task_id"]
    path = {"pending": [], "in_progress": ["in_progress"], "completed": ["completed"],
            "failed": ["failed"], "cancelled": ["cancelled"]}[status]
    for step in path:
        set_status(conn, task_id, step)
    return task_id


@pytest.mark.parametrize(("before", "after"), LEGAL)
def test_legal_transition_is_accepted_and_recorded(conn, before, after) -> None:
    task_id = _task_in(conn, before)
    set_status(conn, task_id, after)
    row = task_row(conn, task_id)
    assert row["status"] == after
    last = events(conn, task_id)[-1]
    assert (last["from_status"], last["to_status"]) == (before, after)
    if after in ("completed", "failed", "cancelled"):
        assert row["completed_at"] is not None and row["next_poll_at"] is None


@pytest.mark.parametrize(("before", "after"), ILLEGAL)
def test_illegal_transition_is_refused_by_the_database(conn, before, after) -> None:
    task_id = _task_in(conn, before)
    with pytest.raises(psycopg.Error) as err:
        set_status(conn, task_id, after)
    assert err.value.sqlstate == "PT409"
    assert f"from {before} to {after}" in str(err.value)
    assert task_row(conn, task_id)["status"] == before


@pytest.mark.parametrize("terminal", ["failed", "cancelled"])
def test_retry_task_is_the_only_way_out_of_a_terminal_state(conn, terminal) -> None:
    task_id = _task_in(conn, terminal)
    retried = conn.execute("select taskman.retry_task(%s) as r", (task_id,)).fetchone()["r"]
    assert retried["status"] == "pending"
    row = task_row(conn, task_id)
    assert row["error_code"] is None and row["completed_at"] is None
    assert row["next_poll_at"] is not None
    assert events(conn, task_id)[-1]["event_type"] == "retried"


def test_completed_tasks_cannot_be_retried(conn) -> None:
    task_id = _task_in(conn, "completed")
    with pytest.raises(psycopg.Error) as err:
        conn.execute("select taskman.retry_task(%s)", (task_id,))
    assert err.value.sqlstate == "PT409"


def test_cancel_task_refuses_a_finished_task(conn) -> None:
    task_id = _task_in(conn, "completed")
    with pytest.raises(psycopg.Error) as err:
        conn.execute("select taskman.cancel_task(%s)", (task_id,))
    assert err.value.sqlstate == "PT409"
    assert task_row(conn, task_id)["status"] == "completed"


def test_failed_without_a_reason_gets_a_neutral_error(conn) -> None:
    task_id = _task_in(conn, "failed")
    row = task_row(conn, task_id)
    assert row["error_code"] == "remote_failed"
    assert row["error_message"] == "The remote job reported that it failed."


def test_plain_insert_as_authenticated_matches_create_task(api, conn) -> None:
    """What n8n's Supabase node sends: an INSERT with only the fields it knows."""
    with api.request("authenticated", USER_A) as cur:
        cur.execute(
            "insert into taskman.tasks"
            " (poll_url, external_id, task_type, max_attempts, timeout_minutes)"
            " values ('https://api.example.com/status/abc123', 'abc123', 'data_processing', 5, 60)"
            " returning *")
        inserted = cur.fetchone()
    via_rpc = api.rpc("authenticated", "create_task", USER_A,
                      poll_url="https://api.example.com/status/abc123", external_id="abc123",
                      task_type="data_processing", max_attempts=5, timeout_minutes=60)
    ignored = {"task_id", "created_at", "updated_at", "deadline_at", "next_poll_at"}
    stored = task_row(conn, via_rpc["task_id"])
    assert {k: v for k, v in inserted.items() if k not in ignored} == {
        k: v for k, v in stored.items() if k not in ignored}
    assert str(inserted["user_id"]) == USER_A
    assert inserted["status"] == "pending" and inserted["poll_method"] == "GET"
    assert inserted["poll_interval_seconds"] == 30 and inserted["metadata"] == {}
    assert inserted["next_poll_at"] == inserted["created_at"]
    assert (inserted["deadline_at"] - inserted["created_at"]).total_seconds() == 3600


def test_plain_insert_with_explicit_nulls_gets_the_defaults(api) -> None:
    with api.request("authenticated", USER_A) as cur:
        cur.execute("insert into taskman.tasks (poll_url, poll_method, task_type, max_attempts,"
                    " metadata) values (null, null, null, null, null) returning *")
        row = cur.fetchone()
    assert (row["poll_method"], row["task_type"], row["max_attempts"], row["metadata"]) == (
        "GET", "generic", 10, {})
    assert row["next_poll_at"] is None  # no poll_url: waits for a callback


def test_same_idempotency_key_from_one_owner_gives_one_task(api, conn) -> None:
    first = api.rpc("authenticated", "create_task", USER_A, idempotency_key="report-42")
    second = api.rpc("authenticated", "create_task", USER_A, idempotency_key="report-42")
    assert first["task_id"] == second["task_id"]
    assert "callback_token" in first and "callback_token" not in second
    assert second["idempotent_replay"] is True
    count = conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"]
    assert count == 1


def test_a_call_that_loses_the_race_for_a_key_answers_with_the_winners_task(
        api, other_api, conn) -> None:
    with ThreadPoolExecutor(1) as pool:
        with api.request("authenticated", USER_A) as first:
            first.execute("select taskman.create_task(poll_url => 'https://a.example.com/1',"
                          " poll_headers => %s, idempotency_key => 'nightly') as r",
                          (json.dumps({"Authorization": "Bearer first"}),))
            winner = first.fetchone()["r"]
            # The second call waits for the first one's transaction, which holds the key.
            second = pool.submit(other_api.rpc, "authenticated", "create_task", USER_A,
                                 poll_url="https://a.example.com/2",
                                 poll_headers=json.dumps({"Authorization": "Bearer second"}),
                                 idempotency_key="nightly")
            time.sleep(0.3)
            assert not second.done()
        loser = second.result(timeout=10)
    assert loser["task_id"] == winner["task_id"] and loser["idempotent_replay"] is True
    assert "callback_token" not in loser
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 1
    assert conn.execute("select count(*) as n from taskman_private.poll_headers_in_flight"
                        ).fetchone()["n"] == 0
    claimed = conn.execute("select poll_url, poll_headers"
                           " from taskman.claim_due_tasks('w1', 10, 60)").fetchall()
    assert claimed == [{"poll_url": "https://a.example.com/1",
                        "poll_headers": {"Authorization": "Bearer first"}}]


def test_upgrading_to_create_without_a_savepoint_keeps_the_keys_already_used(
        server_url, tmp_path) -> None:
    with database_before(server_url, "20261202000400", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            first = create_task(conn, idempotency_key="nightly")
        assert [m.version for m in migrate(url)][:1] == ["20261202000400"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            replay = create_task(conn, idempotency_key="nightly")
            fresh = create_task(conn, idempotency_key="weekly")
            assert (replay["task_id"], replay["idempotent_replay"]) == (first["task_id"], True)
            assert fresh["task_id"] != first["task_id"] and "callback_token" in fresh
            assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 2


def test_same_idempotency_key_from_two_owners_gives_two_tasks(api) -> None:
    a = api.rpc("authenticated", "create_task", USER_A, idempotency_key="report-42")
    b = api.rpc("authenticated", "create_task", USER_B, idempotency_key="report-42")
    assert a["task_id"] != b["task_id"]
    assert (a["user_id"], b["user_id"]) == (USER_A, USER_B)


def test_plain_insert_with_a_used_idempotency_key_is_a_conflict(api) -> None:
    api.rpc("authenticated", "create_task", USER_A, idempotency_key="k1")
    with pytest.raises(psycopg.errors.UniqueViolation), api.request("authenticated", USER_A) as cur:
        cur.execute("insert into taskman.tasks (idempotency_key) values ('k1')")


def test_every_insert_and_status_change_notifies(conn, database_url) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("listen taskman")
        task_id = create_task(conn)["task_id"]
        set_status(conn, task_id, "in_progress")
        conn.execute("update taskman.tasks set metadata = '{\"a\": 1}' where task_id = %s",
                     (task_id,))
        got = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=3)]
    assert [(p["task_id"], p["status"]) for p in got] == [
        (task_id, "pending"), (task_id, "in_progress")]
