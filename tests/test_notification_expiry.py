"""Notifications still undelivered long after they were enqueued are given up, whatever
kept them (a receiver whose circuit stays open spends no attempts), so they and their
tasks do not stay forever; what is young, being sent, or delivered is left alone."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import create_task, events
from tests.test_callback_stream import callback_tasks, complete_all
from tests.worker_harness import start_worker_process, wait_until, worker_settings
from worker.migrate import migrate
from worker.notify.expiry import NotificationExpiry


def _callback(conn, url: str, enqueued_ago: str, **row: object) -> tuple[str, int]:
    """A finished task's callback, enqueued `enqueued_ago`, its outbox row set to `row`."""
    task_id = callback_tasks(conn, [url])[0]
    complete_all(conn, [task_id])
    sets = ", ".join([f"{k} = %({k})s" for k in row] + ["created_at = now() - %(ago)s::interval"])
    outbox_id = conn.execute(
        f"update taskman_private.outbox set {sets} where task_id = %(task_id)s"
        " returning outbox_id", {**row, "ago": enqueued_ago, "task_id": task_id}
    ).fetchone()["outbox_id"]
    return task_id, outbox_id


def _outbox(conn, outbox_id: int) -> dict:
    return conn.execute("select * from taskman_private.outbox where outbox_id = %s",
                        (outbox_id,)).fetchone()


def _give_up(conn, older_than: str, batch_size: int = 200) -> dict:
    return conn.execute("select * from taskman.give_up_stale_notifications(%s::interval, %s)",
                        (older_than, batch_size)).fetchone()


def test_what_stays_undelivered_past_the_age_is_given_up_and_says_why(conn) -> None:
    held, held_id = _callback(conn, "https://down.example.com/hook", "4 days",
                              last_error="connection refused")
    young, young_id = _callback(conn, "https://down.example.com/hook", "1 hour")
    sending, sending_id = _callback(conn, "https://slow.example.com/hook", "4 days",
                                    lease_owner="w1")
    conn.execute("update taskman_private.outbox set next_attempt_at = now() + interval '60 s'"
                 " where outbox_id = %s", (sending_id,))
    _, crashed_id = _callback(conn, "https://slow.example.com/hook", "4 days",
                              lease_owner="gone")  # its lease is over (due now)
    delivered, delivered_id = _callback(conn, "https://up.example.com/hook", "4 days")
    conn.execute("update taskman_private.outbox set delivered_at = now() - interval '4 days'"
                 " where outbox_id = %s", (delivered_id,))
    alert_id = conn.execute(
        "insert into taskman_private.outbox (channel, payload, created_at)"
        " values ('slack', '{}', now() - interval '4 days') returning outbox_id"
    ).fetchone()["outbox_id"]

    assert _give_up(conn, "72 hours") == {"given_up": 3, "done": True}

    for outbox_id in (held_id, crashed_id, alert_id):
        assert _outbox(conn, outbox_id)["given_up_at"] is not None
    assert _outbox(conn, held_id)["last_error"] == (
        "undelivered 4 days after it was enqueued (last: connection refused)")
    assert [e["detail"] for e in events(conn, held)
            if e["event_type"] == "notification_given_up"] == [
        {"channel": "callback", "attempt": 0, "reason": "expired"}]
    for outbox_id in (young_id, sending_id, delivered_id):
        assert _outbox(conn, outbox_id)["given_up_at"] is None
    assert _outbox(conn, sending_id)["lease_owner"] == "w1"
    for task_id in (young, sending, delivered):
        assert not [e for e in events(conn, task_id) if e["event_type"] == "notification_given_up"]
    assert _give_up(conn, "72 hours") == {"given_up": 0, "done": True}


def test_a_task_whose_callback_was_given_up_goes_when_its_retention_ends(conn) -> None:
    _callback(conn, "https://down.example.com/hook", "40 days")
    pending, _ = _callback(conn, "https://down.example.com/hook", "1 hour")
    conn.execute("update taskman.tasks set completed_at = now() - interval '40 days'")
    _give_up(conn, "72 hours")
    pruned = conn.execute("select tasks, outbox_rows"
                          " from taskman.prune_finished_tasks(interval '30 days', 200, false)"
                          ).fetchone()
    assert pruned == {"tasks": 1, "outbox_rows": 1}
    left = conn.execute("select task_id::text from taskman.tasks").fetchall()
    assert left == [{"task_id": pending}]  # its callback is still to be delivered


def test_the_workers_expiry_job_gives_up_in_batches(conn, database_url) -> None:
    ids = callback_tasks(conn, [f"https://down.example.com/hook/{i}" for i in range(450)])
    complete_all(conn, ids)
    conn.execute("update taskman_private.outbox set created_at = now() - interval '2 hours'")
    young = create_task(conn, callback_url="https://down.example.com/young")["task_id"]
    complete_all(conn, [young])
    expiry = NotificationExpiry(worker_settings(database_url, TASKMAN_OUTBOX_MAX_AGE_HOURS="1"))

    async def one_round() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            return await expiry.run_once(c)

    assert asyncio.run(one_round()) == 450  # three batches of at most 200
    left = conn.execute("select count(*) as n from taskman_private.outbox"
                        " where given_up_at is null").fetchone()["n"]
    assert left == 1
    assert asyncio.run(one_round()) == 0


def test_a_worker_process_gives_up_what_waited_past_the_age(conn, database_url,
                                                            workers) -> None:
    # Waiting for its next attempt (as a failed one leaves it): the job, not a delivery,
    # decides.
    task_id, outbox_id = _callback(conn, "https://down.example.com/hook", "2 hours",
                                   attempts=3, last_error="HTTP 503")
    conn.execute("update taskman_private.outbox set next_attempt_at = now() + interval '1 hour'"
                 " where outbox_id = %s", (outbox_id,))
    workers.append(start_worker_process(database_url, TASKMAN_CALLBACK_SECRET="s" * 32,
                                        TASKMAN_OUTBOX_MAX_AGE_HOURS="1"))
    wait_until(lambda: _outbox(conn, outbox_id)["given_up_at"] is not None, timeout=15)
    assert [e["detail"]["attempt"] for e in events(conn, task_id)
            if e["event_type"] == "notification_given_up"] == [3]


def test_max_age_zero_never_gives_up_by_age(database_url) -> None:
    assert not NotificationExpiry(
        worker_settings(database_url, TASKMAN_OUTBOX_MAX_AGE_HOURS="0")).enabled
    assert NotificationExpiry(worker_settings(database_url)).older_than_seconds == 72 * 3_600


@pytest.mark.parametrize(("older_than", "batch_size", "field"), [
    ("-1 hour", 10, "older_than"), (None, 10, "older_than"), ("1 hour", 0, "batch_size"),
    ("1 hour", 10_001, "batch_size")])
def test_bad_arguments_are_refused_and_change_nothing(conn, older_than, batch_size,
                                                      field) -> None:
    _, outbox_id = _callback(conn, "https://down.example.com/hook", "4 days")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        _give_up(conn, older_than, batch_size)
    assert field in str(raised.value)
    assert _outbox(conn, outbox_id)["given_up_at"] is None


def test_a_task_retention_reached_while_its_callback_was_pending_goes_once_it_is_sent(
        conn) -> None:
    task_id, outbox_id = _callback(conn, "https://slow.example.com/hook", "1 hour")
    later = create_task(conn)["task_id"]
    conn.execute("select taskman.update_task(%s, 'completed')", (later,))
    conn.execute("update taskman.tasks set completed_at = now() - interval '40 days'"
                 " where task_id = %s", (task_id,))
    conn.execute("update taskman.tasks set completed_at = now() - interval '39 days'"
                 " where task_id = %s", (later,))
    assert _prune(conn) == {"tasks": 1, "done": False}  # the later one; the cursor passes both
    assert _prune(conn) == {"tasks": 0, "done": True}
    conn.execute("update taskman_private.outbox set delivered_at = now() where outbox_id = %s",
                 (outbox_id,))
    assert _prune(conn) == {"tasks": 1, "done": True}
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 0
    assert conn.execute("select count(*) as n from taskman_private.retention_deferred"
                        ).fetchone()["n"] == 0


def test_a_retention_round_reads_the_tasks_it_waits_for_once_not_in_every_batch(
        conn) -> None:
    waiting = callback_tasks(conn, [f"https://down.example.com/{i}" for i in range(3)])
    complete_all(conn, waiting)  # their callbacks stay pending
    conn.execute("update taskman.tasks set completed_at = now() - interval '40 days'")
    assert _prune(conn)["tasks"] == 0  # the cursor passes them: they wait
    for _ in range(5):
        conn.execute("select taskman.update_task(%s, 'completed')", (create_task(conn)["task_id"],))
    conn.execute("update taskman.tasks set completed_at = now() - interval '35 days'"
                 " where completed_at > now() - interval '1 day'")
    with conn.transaction():  # a round, one task a batch: six batches
        batches = 0
        while not conn.execute("select done from taskman.prune_finished_tasks("
                               "interval '30 days', 1, false)").fetchone()["done"]:
            batches += 1
        read = conn.execute(
            "select seq_tup_read + coalesce(idx_tup_fetch, 0) as n"
            " from pg_stat_xact_user_tables where relid = 'taskman_private.retention_deferred'"
            "::regclass").fetchone()["n"]
    assert batches == 5
    assert read == 3  # each waiting task once, in the round's last batch
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 3


def test_a_task_waiting_for_retention_that_is_retried_stays_while_it_is_live(conn) -> None:
    task_id = callback_tasks(conn, ["https://slow.example.com/hook"])[0]
    conn.execute("select taskman.update_task(%s, 'failed')", (task_id,))
    conn.execute("update taskman.tasks set completed_at = now() - interval '40 days'"
                 " where task_id = %s", (task_id,))
    assert _prune(conn)["tasks"] == 0  # its callback and alert are pending: it waits
    conn.execute("select taskman.retry_task(%s)", (task_id,))  # live again
    conn.execute("update taskman_private.outbox set delivered_at = now() where task_id = %s",
                 (task_id,))
    assert _prune(conn)["tasks"] == 0
    assert conn.execute("select status from taskman.tasks where task_id = %s",
                        (task_id,)).fetchone()["status"] == "pending"
    assert events(conn, task_id)  # its history is all there


def _prune(conn) -> dict:
    return conn.execute("select tasks, done from taskman.prune_finished_tasks("
                        "interval '30 days', 200, false)").fetchone()


def test_upgrading_gives_up_what_a_deployed_database_kept_and_prunes_its_dead_letters(
        server_url, tmp_path) -> None:
    """Before the upgrade, retention passed both tasks for good (one kept by a dead letter,
    one by a callback its receiver's open circuit held) and never took given-up alerts."""
    with database_before(server_url, "20261202000500", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            _, dead_id = _callback(conn, "https://gone.example.com/hook", "40 days",
                                   attempts=12)
            conn.execute("update taskman_private.outbox set given_up_at = now() - interval"
                         " '39 days' where outbox_id = %s", (dead_id,))
            _, held_id = _callback(conn, "https://down.example.com/hook", "5 days")
            conn.execute("update taskman.tasks set completed_at = now() - interval '40 days'")
            assert _prune(conn)["tasks"] == 0  # both kept, and the cursor went past them
            # A circuit's alert, given up at once without Slack settings: never pruned.
            conn.execute("insert into taskman_private.outbox (channel, payload, created_at,"
                         " given_up_at) values ('slack', '{}', now() - interval '40 days',"
                         " now() - interval '40 days')")
        assert [m.version for m in migrate(url)][:1] == ["20261202000500"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert _prune(conn)["tasks"] == 1  # the dead letter's
            assert _give_up(conn, "72 hours") == {"given_up": 1, "done": True}
            assert _outbox(conn, held_id)["given_up_at"] is not None
            assert _prune(conn)["tasks"] == 1
            assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 0
            assert conn.execute("select alerts from taskman.prune_idle_hosts(interval '30 days')"
                                ).fetchone()["alerts"] == 1
