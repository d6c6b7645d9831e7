"""Claiming due tasks, leases, recording results and the overdue sweep."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import (
    create_task,
    events,
    make_due,
    schedule_row,
    set_status,
    task_row,
)
from worker.db import queries as worker_queries
from worker.migrate import migrate


def _claim(conn, worker="w1", batch=100, lease=60):
    rows = conn.execute("select * from taskman.claim_due_tasks(%s, %s, %s)",
                        (worker, batch, lease)).fetchall()
    return [str(r["task_id"]) for r in rows]


def _record(conn, *outcomes):
    return conn.execute("select * from taskman.record_poll_results(%s)",
                        (json.dumps(list(outcomes)),)).fetchall()


def test_concurrent_claims_get_disjoint_tasks(conn, database_url) -> None:
    created = {create_task(conn, poll_url=f"https://api.example.com/{i}")["task_id"]
               for i in range(200)}
    barrier = threading.Barrier(2)
    claimed: dict[str, list[str]] = {}

    def worker(name: str) -> None:
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as c:
            barrier.wait()
            got = []
            while batch := _claim(c, name, batch=7):
                got += batch
            claimed[name] = got

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(claimed["w1"]) & set(claimed["w2"])
    assert set(claimed["w1"]) | set(claimed["w2"]) == created
    assert len(claimed["w1"]) + len(claimed["w2"]) == 200


def test_a_leased_task_is_not_claimed_again_until_its_lease_expires(conn) -> None:
    task_id = create_task(conn)["task_id"]
    assert _claim(conn, "w1", lease=60) == [task_id]
    assert _claim(conn, "w2") == []
    # The worker died; its lease runs out.
    conn.execute("update taskman_private.task_schedule"
                 " set lease_expires_at = now() - interval '1 second',"
                 " next_poll_at = now() - interval '1 second' where task_id = %s", (task_id,))
    assert _claim(conn, "w2") == [task_id]
    assert schedule_row(conn, task_id)["lease_owner"] == "w2"


def test_a_crashed_workers_task_becomes_due_when_the_lease_ends(conn) -> None:
    task_id = create_task(conn)["task_id"]
    claimed = conn.execute("select * from taskman.claim_due_tasks('w1', 10, 1)").fetchone()
    assert schedule_row(conn, task_id)["next_poll_at"] == claimed["lease_expires_at"]


def test_only_due_live_pollable_tasks_are_claimed(conn) -> None:
    due = create_task(conn)["task_id"]
    later = create_task(conn)["task_id"]
    make_due(conn, later, "1 hour")
    create_task(conn, poll_url=None)  # waits for a callback
    for status in ("completed", "failed", "cancelled"):
        set_status(conn, create_task(conn)["task_id"], status)
    assert _claim(conn) == [due]


def test_claim_returns_headers_and_the_effective_profile(conn) -> None:
    create_task(conn, task_type="celery", poll_headers={"X-Api-Key": "k"},
                poll_config={"result_path": "result.url"})
    row = conn.execute("select * from taskman.claim_due_tasks('w1', 10, 60)").fetchone()
    assert row["poll_headers"] == {"X-Api-Key": "k"}
    assert row["profile"]["name"] == "celery"
    assert row["profile"]["completed_values"] == ["SUCCESS"]
    assert row["profile"]["result_path"] == "result.url"


@pytest.mark.parametrize(("task_type", "config", "profile"), [
    ("generic", {}, "generic"),
    ("report", {}, "generic"),
    ("standard", {}, "standard"),
    ("report", {"profile": "http"}, "http"),
    ("celery", {"profile": "standard"}, "standard"),
])
def test_profile_is_chosen_by_config_then_task_type_then_generic(conn, task_type, config,
                                                                 profile) -> None:
    create_task(conn, task_type=task_type, poll_config=config)
    row = conn.execute("select * from taskman.claim_due_tasks('w1', 10, 60)").fetchone()
    assert row["profile"]["name"] == profile


def test_record_poll_results_moves_tasks_and_writes_events_in_one_call(conn) -> None:
    running, done = (create_task(conn)["task_id"] for _ in range(2))
    _claim(conn)
    result = _record(
        conn,
        {"task_id": running, "worker_id": "w1", "ok": True, "status": "in_progress",
         "progress": 40, "progress_message": "rendering", "delay_seconds": 5, "http_status": 200,
         "latency_ms": 12.5},
        {"task_id": done, "worker_id": "w1", "ok": True, "status": "completed",
         "result": {"url": "https://files.example.com/x"}, "http_status": 200},
    )
    assert {(str(r["task_id"]), r["status"]) for r in result} == {
        (running, "in_progress"), (done, "completed")}
    r = task_row(conn, running)
    assert (r["status"], r["progress"], r["progress_message"], r["attempt_count"]) == (
        "in_progress", 40, "rendering", 1)
    assert schedule_row(conn, running)["lease_owner"] is None and r["started_at"] is not None
    assert 4 < (r["next_poll_at"] - r["last_polled_at"]).total_seconds() <= 5.1
    d = task_row(conn, done)
    assert d["result"] == {"url": "https://files.example.com/x"} and d["progress"] == 100
    assert [e["event_type"] for e in events(conn, done)] == ["created", "polled", "status_changed"]


def test_writes_after_a_record_in_its_transaction_go_through_the_task_triggers(conn) -> None:
    # record_poll_results does its own rows' trigger work while it writes; a later write
    # in the same transaction (here a cancel) is checked and recorded as usual.
    polled, other = (create_task(conn)["task_id"] for _ in range(2))
    _claim(conn)
    with conn.transaction():
        _record(conn, {"task_id": polled, "worker_id": "w1", "ok": True, "status": "completed"})
        conn.execute("update taskman.tasks set status = 'cancelled' where task_id = %s",
                     (other,))
        with pytest.raises(psycopg.Error, match="cannot move from completed to pending"), \
                conn.transaction():
            conn.execute("update taskman.tasks set status = 'pending' where task_id = %s",
                         (polled,))
    assert [e["event_type"] for e in events(conn, other)] == ["created", "cancelled"]
    assert task_row(conn, other)["completed_at"] is not None
    assert schedule_row(conn, other)["next_poll_at"] is None
    assert schedule_row(conn, other)["lease_owner"] is None
    done = task_row(conn, polled)
    assert (done["status"], done["progress"]) == ("completed", 100)
    assert done["completed_at"] is not None and done["updated_at"] == done["completed_at"]
    changed = [e for e in events(conn, polled) if e["event_type"] == "status_changed"]
    assert [(e["from_status"], e["to_status"]) for e in changed] == [("pending", "completed")]


def test_errors_count_consecutively_and_fail_the_task_at_max_attempts(conn) -> None:
    task_id = create_task(conn, max_attempts=3)["task_id"]
    for attempt in range(1, 4):
        make_due(conn, task_id)
        assert _claim(conn) == [task_id]
        _record(conn, {"task_id": task_id, "worker_id": "w1", "ok": False, "http_status": 503,
                       "raw_error": "upstream exploded", "delay_seconds": 0})
        assert schedule_row(conn, task_id)["error_count"] == attempt
        row = task_row(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "max_attempts")
    assert row["error_message"] == ("The status endpoint kept failing; Taskman gave up after "
                                    "repeated attempts.")
    kinds = [e["event_type"] for e in events(conn, task_id)]
    assert kinds.count("polled") == 3 and kinds.count("retry_scheduled") == 2


def test_a_successful_poll_resets_the_error_count(conn) -> None:
    task_id = create_task(conn, max_attempts=2)["task_id"]
    for ok in (False, True, False):
        make_due(conn, task_id)
        _claim(conn)
        _record(conn, {"task_id": task_id, "worker_id": "w1", "ok": ok})
    row = {**task_row(conn, task_id), **schedule_row(conn, task_id)}
    assert (row["status"], row["error_count"], row["attempt_count"]) == ("pending", 1, 3)


def test_unreadable_answers_past_max_attempts_fail_as_invalid_response(conn) -> None:
    task_id = create_task(conn, max_attempts=1)["task_id"]
    _claim(conn)
    _record(conn, {"task_id": task_id, "worker_id": "w1", "ok": False,
                   "error_code": "invalid_response"})
    assert task_row(conn, task_id)["error_code"] == "invalid_response"


def test_a_stale_worker_cannot_record_after_its_lease_moved_on(conn) -> None:
    task_id = create_task(conn)["task_id"]
    _claim(conn, "w1")
    make_due(conn, task_id)
    _claim(conn, "w2")
    assert _record(conn, {"task_id": task_id, "worker_id": "w1", "ok": True,
                          "status": "completed"}) == []
    assert task_row(conn, task_id)["status"] == "pending"


def test_release_tasks_gives_back_only_that_workers_leases(conn) -> None:
    mine, theirs = (create_task(conn)["task_id"] for _ in range(2))
    _claim(conn, "w1", batch=1)
    _claim(conn, "w2", batch=1)
    assert conn.execute("select taskman.release_tasks('w1') as n").fetchone()["n"] == 1
    assert schedule_row(conn, mine)["lease_owner"] is None
    assert schedule_row(conn, theirs)["lease_owner"] == "w2"
    assert _claim(conn, "w3") == [mine]


def test_sweep_fails_overdue_tasks_with_timeout_even_if_never_polled(conn) -> None:
    polled = create_task(conn)["task_id"]
    never_polled = create_task(conn, poll_url=None)["task_id"]
    fresh = create_task(conn)["task_id"]
    conn.execute("update taskman.tasks set deadline_at = now() - interval '1 second'"
                 " where task_id in (%s, %s)", (polled, never_polled))
    assert conn.execute("select taskman.expire_overdue_tasks() as n").fetchone()["n"] == 2
    for task_id in (polled, never_polled):
        row = task_row(conn, task_id)
        assert (row["status"], row["error_code"]) == ("failed", "timeout")
        assert row["error_message"] == "The task did not finish before its deadline."
    assert task_row(conn, fresh)["status"] == "pending"
    assert conn.execute("select taskman.expire_overdue_tasks() as n").fetchone()["n"] == 0


def test_a_poll_past_the_deadline_fails_the_task_with_timeout(conn) -> None:
    task_id = create_task(conn)["task_id"]
    _claim(conn)
    conn.execute("update taskman.tasks set deadline_at = now() where task_id = %s", (task_id,))
    _record(conn, {"task_id": task_id, "worker_id": "w1", "ok": True, "status": "in_progress"})
    assert task_row(conn, task_id)["error_code"] == "timeout"


def test_ending_a_task_queues_its_callback_and_failures_queue_an_alert(conn) -> None:
    ok = create_task(conn, callback_url="https://hooks.example.com/ok")["task_id"]
    bad = create_task(conn, callback_url="https://hooks.example.com/bad")["task_id"]
    quiet = create_task(conn)["task_id"]
    set_status(conn, ok, "completed")
    set_status(conn, bad, "failed")
    set_status(conn, quiet, "cancelled")
    rows = conn.execute("select task_id::text, channel, payload from taskman_private.outbox"
                        " order by outbox_id").fetchall()
    assert [(r["task_id"], r["channel"]) for r in rows] == [
        (ok, "callback"), (bad, "callback"), (bad, "slack")]
    assert rows[0]["payload"]["status"] == "completed"
    assert "lease_owner" not in rows[0]["payload"] and "poll_headers" not in rows[0]["payload"]


def _sequential_scans(conn, table: str) -> int:
    conn.execute("select pg_stat_force_next_flush()")
    return conn.execute("select seq_scan from pg_stat_user_tables where relid = %s::regclass",
                        (table,)).fetchone()["seq_scan"]


@pytest.mark.parametrize("cycle", ["claim", "worker's claim", "record"])
def test_claim_and_record_read_rows_by_key_whatever_the_statistics_say(conn, cycle) -> None:
    """Statistics taken while task_private was empty (a new project, an ANALYZE) must not
    make the cached plans read the whole table once per task as it grows: a burst of
    new tasks would turn each claim quadratic until the next autoanalyze."""
    conn.execute("analyze taskman_private.task_private, taskman.tasks,"
                 " taskman_private.task_schedule")  # all empty: 0 rows each
    ids = [create_task(conn, poll_url=f"https://api.example.com/{i}",
                       poll_headers={"X-Key": "k"})["task_id"] for i in range(300)]
    with psycopg.connect(conn.info.dsn, autocommit=True, row_factory=dict_row) as fresh:
        # A new session plans afresh, with those statistics.
        scans = {t: _sequential_scans(fresh, t) for t in
                 ("taskman_private.task_private", "taskman.tasks",
                  "taskman_private.task_schedule")}
        if cycle == "worker's claim":
            claimed = [str(r["task_id"]) for r in fresh.execute(
                "select task_id from taskman.claim_admitted_tasks('w1', 100, 60)")]
        else:
            claimed = _claim(fresh)
        if cycle == "record":
            _record(fresh, *[{"task_id": i, "worker_id": "w1", "ok": True,
                              "status": "completed", "raw_response": "{}"} for i in claimed])
        assert len(claimed) == 100 and set(claimed) <= set(ids)
        assert {t: _sequential_scans(fresh, t) - n for t, n in scans.items()} == dict.fromkeys(
            scans, 0)


def test_the_workers_outbox_claim_reads_by_key_whatever_the_statistics_say(conn) -> None:
    """As the task claim: statistics of empty tables must not make each callback claim
    read the whole outbox or task_private."""
    conn.execute("analyze taskman_private.task_private, taskman_private.outbox")
    ids = [create_task(conn, callback_url=f"https://hooks.example.com/{i}",
                       callback_headers={"Authorization": "Bearer k"})["task_id"]
           for i in range(300)]
    conn.execute("select taskman.update_task(t, 'completed') from unnest(%s::uuid[]) t", (ids,))
    with psycopg.connect(conn.info.dsn, autocommit=True, row_factory=dict_row) as fresh:
        scans = {t: _sequential_scans(fresh, t) for t in
                 ("taskman_private.task_private", "taskman_private.outbox")}
        claimed = fresh.execute(worker_queries()["claim_outbox"], {
            "worker_id": "w1", "batch_size": 100, "lease_seconds": 60,
            "only_channel": "callback", "skip_hosts": None}).fetchall()
        assert len(claimed) == 100
        assert {r["headers"]["Authorization"] for r in claimed} == {"Bearer k"}
        assert {t: _sequential_scans(fresh, t) - n for t, n in scans.items()} == dict.fromkeys(
            scans, 0)


def test_upgrading_to_deliveries_by_key_claims_callbacks_enqueued_before(server_url,
                                                                         tmp_path) -> None:
    with database_before(server_url, "20261202000700", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            task_id = create_task(conn, callback_url="https://hooks.example.com/a",
                                  callback_headers={"Authorization": "Bearer k"})["task_id"]
            conn.execute("select taskman.update_task(%s, 'completed')", (task_id,))
        assert [m.version for m in migrate(url)][:1] == ["20261202000700"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            claimed = conn.execute(worker_queries()["claim_outbox"], {
                "worker_id": "w1", "batch_size": 10, "lease_seconds": 60,
                "only_channel": None, "skip_hosts": None}).fetchall()
            assert [(str(r["task_id"]), r["channel"], r["headers"]) for r in claimed] == [
                (task_id, "callback", {"Authorization": "Bearer k"})]
            config = conn.execute("select proconfig from pg_proc where proname = 'claim_outbox'"
                                  ).fetchone()["proconfig"]
            assert "enable_seqscan=off" in config
