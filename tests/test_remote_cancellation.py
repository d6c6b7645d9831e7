"""A remote that says its job was cancelled ends the task `cancelled`: a neutral message,
no failure alert, the completion callback as for any end; only the lease holder decides."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import create_task, events, schedule_row, task_row
from tests.remote_api import Reply
from tests.worker_harness import running_worker, wait_until
from worker.migrate import migrate

NEUTRAL = "The remote job was cancelled."


def ended(conn: psycopg.Connection, task_id: str) -> dict:
    def probe() -> dict | None:
        row = task_row(conn, task_id)
        return row if row["status"] in ("completed", "failed", "cancelled") else None
    return wait_until(probe)


def outbox_channels(conn: psycopg.Connection, task_id: str) -> list[str]:
    rows = conn.execute("select channel from taskman_private.outbox where task_id = %s "
                        "order by channel", (task_id,)).fetchall()
    return [r["channel"] for r in rows]


@pytest.mark.parametrize(("answer", "poll_config"), [
    ({"status": "cancelled"}, {}),
    ({"state": "REVOKED"}, {"profile": "celery"}),
    ({"job": {"phase": "Aborted-By-User"}},
     {"status_path": "job.phase", "cancelled_values": ["aborted-by-user"]}),
])
def test_a_cancelled_remote_job_ends_the_task_cancelled_without_an_alert(
    conn, database_url, remote, answer, poll_config
) -> None:
    url = remote.script("/jobs/c", Reply(json=answer))
    task_id = create_task(conn, poll_url=url, poll_config=poll_config,
                          callback_url="https://hooks.example.com/done")["task_id"]
    with running_worker(database_url):
        row = ended(conn, task_id)

    assert (row["status"], row["error_code"], row["error_message"]) == (
        "cancelled", None, NEUTRAL)
    assert row["completed_at"] is not None and row["attempt_count"] == 1
    assert schedule_row(conn, task_id)["next_poll_at"] is None
    assert outbox_channels(conn, task_id) == ["callback"]  # no Slack alert
    [payload] = [r["payload"] for r in conn.execute(
        "select payload from taskman_private.outbox where task_id = %s", (task_id,))]
    assert payload["status"] == "cancelled" and payload["error_message"] == NEUTRAL
    kinds = [(e["event_type"], e["detail"].get("outcome")) for e in events(conn, task_id)]
    assert kinds[-2:] == [("polled", "cancelled"), ("cancelled", None)]
    kept = conn.execute("select last_response from taskman_private.task_private "
                        "where task_id = %s", (task_id,)).fetchone()["last_response"]
    assert json.loads(kept) == answer


def test_only_the_lease_holder_can_record_a_cancellation(conn) -> None:
    task_id = create_task(conn)["task_id"]
    conn.execute("select * from taskman.claim_due_tasks('worker-a', 10, 60)")
    outcome = [{"task_id": task_id, "worker_id": "worker-b", "http_status": 200}]

    stolen = conn.execute("select taskman.record_remote_cancellations(%s::jsonb) as n",
                          (json.dumps(outcome),)).fetchone()["n"]
    assert stolen == 0
    assert task_row(conn, task_id)["status"] == "pending"

    outcome[0]["worker_id"] = "worker-a"
    held = conn.execute("select taskman.record_remote_cancellations(%s::jsonb) as n",
                        (json.dumps(outcome),)).fetchone()["n"]
    assert held == 1
    assert task_row(conn, task_id)["status"] == "cancelled"
    assert schedule_row(conn, task_id)["lease_owner"] is None


@pytest.mark.parametrize("results", ["{}", '[{"worker_id": "w"}]', '[{"task_id": null}]'])
def test_malformed_cancellations_are_refused_and_change_nothing(conn, results) -> None:
    task_id = create_task(conn)["task_id"]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="results"):
        conn.execute("select taskman.record_remote_cancellations(%s::jsonb)", (results,))
    assert task_row(conn, task_id)["status"] == "pending"


def test_users_cannot_call_the_worker_function(api, conn) -> None:
    task_id = create_task(conn)["task_id"]
    for role in ("anon", "authenticated"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api.rpc(role, "record_remote_cancellations",
                    results=json.dumps([{"task_id": task_id, "worker_id": "w"}]))
    assert task_row(conn, task_id)["status"] == "pending"


def test_a_cancelled_values_override_must_be_a_list_of_strings(conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cancelled_values"):
        create_task(conn, poll_config={"cancelled_values": "ABORTED"})


def test_the_upgrade_keeps_operator_profiles_and_live_tasks(server_url, tmp_path) -> None:
    """A database at the previous migration, with an operator's profile and a live task
    using it, upgrades: the profile reads as before (no cancelled values), Celery's REVOKED
    moves from failed to cancelled, the task keeps its config."""
    with database_before(server_url, "20261201001000", tmp_path) as url, \
            psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("insert into taskman.response_profiles (name, status_path, "
                     "completed_values, failed_values) values "
                     "('acme', 'phase', '{DONE}', '{BROKEN}')")
        task_id = create_task(conn, poll_config={"profile": "acme"})["task_id"]
        assert "celery_and_policy" in [m.name for m in migrate(url)]
        profiles = {r["name"]: r for r in conn.execute(
            "select name, failed_values, cancelled_values from taskman.response_profiles")}
        assert (profiles["acme"]["failed_values"], profiles["acme"]["cancelled_values"]) == (
            ["BROKEN"], [])
        assert (profiles["celery"]["failed_values"],
                profiles["celery"]["cancelled_values"]) == (["FAILURE"], ["REVOKED"])
        row = task_row(conn, task_id)
        assert (row["status"], row["poll_config"]) == ("pending", {"profile": "acme"})
