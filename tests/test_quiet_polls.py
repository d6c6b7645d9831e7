"""Quiet polls: what a poll with no news costs subscribers (Realtime, /events) and history.

Realtime carries every row version of taskman.tasks that logical decoding emits, so a
``test_decoding`` slot counts exactly what subscribers would receive.
"""

from __future__ import annotations

import json
from datetime import datetime

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.factories import USER_A, USER_B, create_task, events, make_due, schedule_row


def _claim(conn, worker="w1"):
    return [str(r["task_id"]) for r in conn.execute(
        "select task_id from taskman.claim_due_tasks(%s, 100, 60)", (worker,)).fetchall()]


def _poll(conn, task_id: str, **outcome) -> None:
    """One claim and one recorded outcome, as the worker does them."""
    make_due(conn, task_id)
    assert _claim(conn) == [task_id]
    conn.execute("select * from taskman.record_poll_results(%s)", (json.dumps([
        {"task_id": task_id, "worker_id": "w1", "ok": True, "http_status": 200,
         "latency_ms": 3.2, "delay_seconds": 30, **outcome}]),))


def test_polls_with_no_news_write_nothing_subscribers_receive(conn, decoding) -> None:
    task_id = create_task(conn)["task_id"]
    _poll(conn, task_id, status="in_progress", progress=10)
    decoding()  # what came before: the insert and the first, visible poll

    for _ in range(10):
        _poll(conn, task_id, status="in_progress", progress=10)
    assert decoding() == []

    _poll(conn, task_id, status="in_progress", progress=20)
    changed = decoding()
    assert len(changed) == 1 and changed[0].startswith("table taskman.tasks: UPDATE:")
    assert "progress[integer]:20" in changed[0]

    _poll(conn, task_id, status="completed", result={"url": "https://files.example.com/r"})
    assert len(decoding()) == 1  # the end: one row version, status and result together


def test_owners_still_see_how_many_polls_were_made_and_when_the_last_was(conn, api) -> None:
    with api.request("authenticated", USER_A) as cur:
        cur.execute("select taskman.create_task(poll_url => 'https://api.example.com/a') as t")
        task_id = cur.fetchone()["t"]["task_id"]
    _poll(conn, task_id, status="in_progress")
    for _ in range(4):
        _poll(conn, task_id, status="in_progress")
    last = schedule_row(conn, task_id)["last_polled_at"]

    status = api.rpc("authenticated", "get_task_status", USER_A, task_id=task_id)
    assert status["attempt_count"] == 5
    assert status["last_polled_at"] is not None
    with api.request("authenticated", USER_A) as cur:
        cur.execute("select taskman.task_json(t) as j from taskman.tasks t")
        task = cur.fetchone()["j"]
    assert (task["attempt_count"], task["error_count"]) == (5, 0)
    # JSON drops trailing zeros of the microseconds: compare instants, not text.
    assert datetime.fromisoformat(task["last_polled_at"]) == last
    assert "lease_owner" not in task and "poll_headers" not in task
    # The live figures are the owner's alone.
    with api.request("authenticated", USER_B) as cur:
        cur.execute("select taskman_private.poll_state(%s) as s", (task_id,))
        assert cur.fetchone()["s"] is None


def test_a_thousand_polls_without_news_leave_a_handful_of_events(conn) -> None:
    task_id = create_task(conn)["task_id"]
    _poll(conn, task_id, status="in_progress", progress=5)
    for _ in range(1000):
        _poll(conn, task_id, status="in_progress", progress=5)
    _poll(conn, task_id, ok=False, http_status=503, reason="http_status")
    _poll(conn, task_id, status="completed")

    kinds = [e["event_type"] for e in events(conn, task_id)]
    assert kinds == ["created", "polled", "status_changed",  # started, with progress
                     "polled", "retry_scheduled",  # the failed poll
                     "polled", "status_changed"]  # the end
    failed = next(e for e in events(conn, task_id) if e["detail"].get("outcome") == "error")
    assert (failed["detail"]["http_status"], failed["detail"]["attempt"]) == (503, 1002)
    # The last poll's HTTP status and latency, and the count, stay with the service.
    schedule = schedule_row(conn, task_id)
    assert (schedule["attempt_count"], schedule["last_http_status"]) == (1003, 200)
    assert schedule["last_latency_ms"] == pytest.approx(3.2)


def test_a_progress_change_notifies_like_a_status_change(conn, database_url) -> None:
    task_id = create_task(conn)["task_id"]
    _poll(conn, task_id, status="in_progress", progress=10)
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as listener:
        listener.execute("listen taskman")
        _poll(conn, task_id, status="in_progress", progress=10)  # no news: no notification
        _poll(conn, task_id, status="in_progress", progress=60)
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=2)]
    assert [(n["task_id"], n["status"]) for n in notes] == [(task_id, "in_progress")]


def test_a_cancel_during_a_lease_ends_polling(conn) -> None:
    task_id = create_task(conn)["task_id"]
    assert _claim(conn) == [task_id]
    conn.execute("select taskman.cancel_task(%s)", (task_id,))
    conn.execute("select * from taskman.record_poll_results(%s)", (json.dumps([
        {"task_id": task_id, "worker_id": "w1", "ok": True, "status": "completed"}]),))
    assert conn.execute("select status from taskman.tasks").fetchone()["status"] == "cancelled"
    assert schedule_row(conn, task_id)["next_poll_at"] is None
    conn.execute("select taskman.retry_task(%s)", (task_id,))
    assert _claim(conn) == [task_id]  # a retried task is due again at once
