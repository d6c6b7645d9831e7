"""``taskman worker`` as a process: crashes, graceful shutdown, several workers, bad config."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg

from tests.factories import count_status
from tests.remote_api import Reply
from tests.worker_harness import exit_code, start_worker_process, wait_until
from worker.devtools.pgcluster import free_port

DONE = Reply(json={"status": "done", "result": {"ok": True}})
# Slow polls must neither time out nor take every slot of the one test host.
PATIENT = {"TASKMAN_POLL_TIMEOUT": "120", "TASKMAN_PER_HOST_CONCURRENCY": "50"}


def insert_tasks(conn: psycopg.Connection, urls: list[str]) -> list[str]:
    """Create one task a URL in one statement (one transaction, so one wake-up)."""
    rows = conn.execute("insert into taskman.tasks (poll_url) select unnest(%s::text[])"
                        " returning task_id", (urls,)).fetchall()
    return [str(r["task_id"]) for r in rows]


def listening_workers(conn: psycopg.Connection) -> int:
    return conn.execute(
        "select count(*) as n from pg_stat_activity where datname = current_database()"
        " and application_name = 'taskman-worker-listen'").fetchone()["n"]


def test_tasks_of_a_killed_worker_are_finished_by_another_exactly_once(
        conn, database_url, remote, workers) -> None:
    slow = [remote.script(f"/slow/{i}", Reply(delay=60, json={"status": "done"}), DONE)
            for i in range(10)]
    fast = [remote.script(f"/fast/{i}", DONE) for i in range(10)]
    task_ids = insert_tasks(conn, slow + fast)
    workers.append(start_worker_process(database_url, TASKMAN_LEASE_SECONDS="5", **PATIENT))
    wait_until(lambda: count_status(conn, "completed") == 10
               and all(remote.hits(f"/slow/{i}") for i in range(10)))
    workers[0].kill()  # kill -9 with ten polls in flight
    workers[0].wait()

    workers.append(start_worker_process(database_url, TASKMAN_LEASE_SECONDS="5", **PATIENT))
    wait_until(lambda: count_status(conn, "completed") == 20, timeout=30)
    endings = conn.execute(
        "select task_id, count(*) as n from taskman.task_events"
        " where to_status in ('completed', 'failed', 'cancelled') group by task_id").fetchall()
    assert sorted(str(r["task_id"]) for r in endings) == sorted(task_ids)
    assert all(r["n"] == 1 for r in endings)
    assert all(len(remote.hits(f"/slow/{i}")) == 2 for i in range(10))


def test_two_workers_never_poll_the_same_task_twice(conn, database_url, remote,
                                                    workers) -> None:
    for _ in range(2):
        workers.append(start_worker_process(database_url, TASKMAN_BATCH_SIZE="10"))
    wait_until(lambda: listening_workers(conn) == 2)
    paths = [f"/jobs/{i}" for i in range(300)]
    insert_tasks(conn, [remote.script(p, Reply(delay=0.01, json={"status": "done"}))
                        for p in paths])
    wait_until(lambda: count_status(conn, "completed") == 300, timeout=60)
    assert [p for p in paths if len(remote.hits(p)) != 1] == []


def test_sigterm_records_finished_polls_releases_the_rest_and_exits_zero(
        conn, database_url, remote, workers) -> None:
    quick = [remote.script(f"/quick/{i}", Reply(delay=1, json={"status": "done"}))
             for i in range(5)]
    stuck = [remote.script(f"/stuck/{i}", Reply(delay=60, json={"status": "done"}))
             for i in range(5)]
    insert_tasks(conn, quick + stuck)
    process = start_worker_process(database_url, "--log-format", "json",
                                   TASKMAN_SHUTDOWN_GRACE="3", **PATIENT)
    workers.append(process)
    wait_until(lambda: all(remote.hits(f"/{kind}/{i}") for kind in ("quick", "stuck")
                           for i in range(5)))
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 10) == 0
    assert time.monotonic() - signalled < 3 + 1.5

    assert count_status(conn, "completed") == 5
    leftover = conn.execute("select t.status, s.lease_owner, s.next_poll_at <= now() as due"
                            " from taskman.tasks t"
                            " join taskman_private.task_schedule s using (task_id)"
                            " where t.status <> 'completed'").fetchall()
    assert leftover == [{"status": "pending", "lease_owner": None, "due": True}] * 5
    logs = [json.loads(line) for line in process.stderr.read().splitlines()]
    assert any("released 5 unfinished tasks" in entry["message"] for entry in logs)


def test_sigterm_while_the_last_polls_finish_together_exits_as_soon_as_they_are_recorded(
        conn, database_url, remote, workers) -> None:
    """The last polls end a few milliseconds apart, after SIGTERM: the recorder, still
    gathering the first into a batch when the second ends and the drain begins, records
    both and the worker exits then, not after the grace for recording runs out."""
    apart = [remote.script(f"/apart/{i}", Reply(delay=1 + 0.003 * i, json={"status": "done"}))
             for i in range(4)]
    insert_tasks(conn, apart)
    process = start_worker_process(database_url, "--log-format", "json",
                                   TASKMAN_SHUTDOWN_GRACE="3", **PATIENT)
    workers.append(process)
    wait_until(lambda: all(remote.hits(f"/apart/{i}") for i in range(4)))
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 15) == 0
    assert time.monotonic() - signalled < 1 + 1.5

    assert count_status(conn, "completed") == 4
    logs = [json.loads(line) for line in process.stderr.read().splitlines()]
    assert not [e for e in logs if e["level"] in ("warning", "error")], logs


@contextmanager
def read_only(conn: psycopg.Connection) -> Iterator[None]:
    """The database refuses writes in every session opened meanwhile, as when a full disk
    makes a Supabase project read-only. A session keeps the default it began with, so
    writes are allowed again only in sessions opened after."""
    database = conn.execute("select current_database() as name").fetchone()["name"]
    conn.execute(f"alter database {database} set default_transaction_read_only = on")
    try:
        yield
    finally:
        conn.execute(f"alter database {database} reset default_transaction_read_only")


def test_a_database_gone_read_only_pauses_polling_until_writes_are_allowed_again(
        conn, database_url, remote, workers) -> None:
    """Every claim is refused: the worker does not exit, it claims again with backoff on
    a new session and polls once the database takes writes again."""
    insert_tasks(conn, [remote.script("/after-the-outage", DONE)])
    with read_only(conn):
        process = start_worker_process(database_url, "--log-format", "json")
        workers.append(process)
        time.sleep(3)
        assert process.poll() is None
        assert not remote.hits("/after-the-outage")
    wait_until(lambda: count_status(conn, "completed") == 1)
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 15) == 0
    logs = [json.loads(line) for line in process.stderr.read().splitlines()]
    refused = [e for e in logs if "claiming refused by the database" in e["message"]]
    assert refused and all("25006" in e["message"] and e["level"] == "error" for e in refused)


def test_sigterm_while_every_query_is_refused_still_exits_within_the_grace(
        conn, database_url, remote, workers) -> None:
    """Shutdown with the claims, the jobs and the release of leases all refused: the
    worker logs each and exits 0 within its grace (the leases expire on their own)."""
    insert_tasks(conn, [remote.script("/never", DONE)])
    with read_only(conn):
        process = start_worker_process(database_url, TASKMAN_SHUTDOWN_GRACE="3")
        workers.append(process)
        time.sleep(2)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert exit_code(process, 30) == 0
        assert time.monotonic() - signalled < 3 + 1.5
    assert not remote.hits("/never")


def test_tasks_held_ready_for_a_slot_never_exceed_the_concurrency_and_go_back_at_sigterm(
        conn, database_url, remote, workers) -> None:
    """The worker claims up to half its slots' worth beyond its free slots (so a freed
    slot does not wait for a claim): those wait for a slot, and a stopping worker gives
    them back unpolled, due at once for the others."""
    stuck = [remote.script(f"/stuck/{i}", Reply(delay=60, json={"status": "done"}))
             for i in range(8)]
    insert_tasks(conn, stuck)
    process = start_worker_process(database_url, "--log-format", "json",
                                   TASKMAN_CONCURRENCY="4", TASKMAN_SHUTDOWN_GRACE="1",
                                   **PATIENT)
    workers.append(process)

    def polled() -> int:
        return sum(bool(remote.hits(f"/stuck/{i}")) for i in range(8))

    wait_until(lambda: polled() == 4)
    wait_until(lambda: conn.execute(
        "select count(*) as n from taskman_private.task_schedule"
        " where lease_owner is not null").fetchone()["n"] == 4 + 2)
    time.sleep(0.5)
    assert polled() == 4
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 10) == 0

    assert sum(len(remote.hits(f"/stuck/{i}")) for i in range(8)) == 4
    leftover = conn.execute("select t.status, s.lease_owner, s.next_poll_at <= now() as due"
                            " from taskman.tasks t"
                            " join taskman_private.task_schedule s using (task_id)").fetchall()
    assert leftover == [{"status": "pending", "lease_owner": None, "due": True}] * 8
    logs = [json.loads(line) for line in process.stderr.read().splitlines()]
    assert any("released 6 unfinished tasks" in entry["message"] for entry in logs)


def test_invalid_configuration_names_the_setting_and_exits_2(database_url) -> None:
    process = start_worker_process(database_url, TASKMAN_CONCURRENCY="0")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "TASKMAN_CONCURRENCY" in stderr


def test_worker_serves_its_poll_metrics(database_url, conn, remote, workers) -> None:
    port = free_port()
    workers.append(start_worker_process(database_url, "--metrics-port", str(port)))
    insert_tasks(conn, [remote.script("/jobs/m1", DONE)])
    wait_until(lambda: count_status(conn, "completed") == 1)
    text = wait_until(lambda: _scrape(port))
    assert 'taskman_worker_polls_total{outcome="completed"} 1.0' in text
    assert "taskman_worker_claim_duration_seconds_count" in text


def _scrape(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return None
