"""Completion callbacks go through their receivers' host circuits: a receiver that is down
gets a few probes, not a retry per callback; its callbacks wait, due and with their
delivery ids, without spending attempts; they all arrive once it is back; another
receiver is unaffected meanwhile. Real receivers on 127.0.0.1, a real worker process."""

from __future__ import annotations

import time

import psycopg

from tests.remote_api import Reply, start_receiver
from tests.test_callback_stream import callback_tasks, complete_all
from tests.test_hosts import BREAKER, host_row
from tests.worker_harness import start_worker_process, wait_until
from worker.remote.host_keys import host_key

# Outbox retries as fast as the poll retries of the tests: without the breaker, each of
# 20 callbacks to a dead receiver retries on its own until dead-lettered.
FAST_RETRIES = {"TASKMAN_OUTBOX_RETRY_BASE": "0.05", "TASKMAN_OUTBOX_RETRY_MAX": "0.2",
                "TASKMAN_OUTBOX_MAX_ATTEMPTS": "6", "TASKMAN_PER_HOST_CONCURRENCY": "2"}


def outbox_rows(conn: psycopg.Connection, task_ids: list[str]) -> list[dict]:
    return conn.execute(
        "select outbox_id, attempts, delivered_at, given_up_at from taskman_private.outbox"
        " where channel = 'callback' and task_id = any(%s::uuid[]) order by outbox_id",
        (task_ids,)).fetchall()


def test_a_receiver_down_then_back_gets_a_few_probes_and_every_callback_after(
        conn, database_url, workers) -> None:
    down = start_receiver(answer={"received": True})
    other = start_receiver(answer={"received": True})
    try:
        down.default = Reply(503, json={"error": "unavailable"})
        down.stop()  # connection refused first
        key = host_key(down.url())
        workers.append(start_worker_process(database_url, **BREAKER, **FAST_RETRIES))
        held = callback_tasks(conn, [down.url(f"/hook/{i}") for i in range(20)])
        fine = callback_tasks(conn, [other.url(f"/hook/{i}") for i in range(10)])
        complete_all(conn, held + fine)

        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        # The other receiver's callbacks arrive meanwhile.
        wait_until(lambda: len(other.delivered()) == 10, timeout=5)
        time.sleep(0.3)  # the callbacks in flight when it opened come back
        failures_at_open = host_row(conn, key)["failures_total"]
        time.sleep(1.5)
        refused_probes = host_row(conn, key)["failures_total"] - failures_at_open
        down.start()  # it answers again, with 503s
        time.sleep(1.5)
        hits_during_503s = len(down.hits())
        rows = outbox_rows(conn, held)
        assert all(r["delivered_at"] is None and r["given_up_at"] is None for r in rows)
        down.default = Reply(200, json={"received": True})
        wait_until(lambda: len({h.path for h in down.delivered()}) == 20, timeout=20)
    finally:
        down.stop()
        other.stop()

    # Without the breaker: 20 refused in the first window alone, then dead letters.
    assert 1 <= refused_probes <= 8
    assert 1 <= hits_during_503s <= 8
    rows = outbox_rows(conn, held)
    assert all(r["delivered_at"] is not None and r["given_up_at"] is None for r in rows)
    # Only the failures before the circuit opened spent attempts.
    assert max(r["attempts"] for r in rows) <= 3
    delivery_ids = {h.headers["X-Taskman-Delivery"] for h in down.delivered()}
    assert delivery_ids == {str(r["outbox_id"]) for r in rows}
    assert len({h.path for h in other.delivered()}) == 10
    row = host_row(conn, key)
    assert (row["state"], row["consecutive_failures"]) == ("closed", 0)
    assert host_row(conn, host_key(other.url())) is None  # never failed


def test_hold_callbacks_refuses_bad_input_with_22023(conn) -> None:
    for sql, field in [
        ("select taskman.hold_callbacks('', '[]')", "worker_id"),
        ("select taskman.hold_callbacks('w', '{}')", "requests"),
        ("""select taskman.hold_callbacks('w', '[{"outbox_id": "x"}]')""", "requests"),
        ("select taskman.hold_callbacks('w', '[]', 0)", "cooldown_seconds"),
    ]:
        try:
            conn.execute(sql)
        except psycopg.errors.InvalidParameterValue as exc:
            assert field in str(exc)
        else:
            raise AssertionError(f"{sql} was accepted")


def test_one_owners_failing_callbacks_leave_another_owners_on_the_same_receiver_alone(
        conn, database_url, workers) -> None:
    """A shared receiver that refuses B's hooks (its path, its credentials) opens B's
    circuit on it, not the receiver's: A's callbacks there all arrive."""
    from tests.factories import USER_A, USER_B
    receiver = start_receiver(answer={"received": True})
    try:
        receiver.default = Reply(503, json={"error": "no such hook"})
        for i in range(10):
            receiver.script(f"/a/{i}", Reply(200, json={"received": True}))
        key = host_key(receiver.url())
        workers.append(start_worker_process(database_url, **BREAKER, **FAST_RETRIES))

        def owned(user: str, urls: list[str]) -> list[str]:
            rows = conn.execute(
                "insert into taskman.tasks (callback_url, user_id)"
                " select unnest(%s::text[]), %s returning task_id", (urls, user)).fetchall()
            return [str(r["task_id"]) for r in rows]

        b_tasks = owned(USER_B, [receiver.url(f"/b/{i}") for i in range(20)])
        complete_all(conn, b_tasks)
        wait_until(lambda: (row := host_row(conn, f"{key}#{USER_B}")) and row["state"] == "open")
        a_tasks = owned(USER_A, [receiver.url(f"/a/{i}") for i in range(10)])
        complete_all(conn, a_tasks)
        wait_until(lambda: len({h.path for h in receiver.delivered()}) == 10, timeout=10)
    finally:
        receiver.stop()

    assert all(r["delivered_at"] is not None for r in outbox_rows(conn, a_tasks))
    assert host_row(conn, key)["state"] == "closed"
    assert host_row(conn, f"{key}#{USER_A}") is None
