"""The worker, the CLI and migrations through a transaction pooler and a session pooler.

PgBouncer (started by the test session, see tests/conftest.py) stands in for Supabase's
Supavisor. In transaction mode each transaction may run on another server connection:
a statement prepared on one does not exist on the next, and session state and LISTEN
do not outlive the transaction.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from pydantic import ValidationError

from tests.conftest import require_pgbouncer
from tests.edge.conftest import API_KEY, serve_edge
from tests.edge.test_events import Listener
from tests.factories import count_status
from tests.poolers import CHANGE_CHECK_INTERVAL, Arrangement
from tests.remote_api import Reply
from tests.worker_harness import REPO, exit_code, start_worker_process, wait_until
from worker.config import Settings
from worker.db import ConfigurationError, Connections, detect_pool_mode
from worker.devtools.pgbouncer import PgBouncer
from worker.edge.sse import MISSING_SECONDS, ChangeCursor
from worker.migrate import list_migrations

RUNNING = Reply(json={"status": "running"})
DONE = Reply(json={"status": "done", "result": {"ok": True}})
POOLER_URL = "postgresql://postgres.abcdefghij:s3cret@aws-0-eu-central-1.pooler.supabase.com"


def insert_tasks(conn: psycopg.Connection, urls: list[str]) -> list[str]:
    """One task a URL, polled every second while running, in one statement."""
    rows = conn.execute("insert into taskman.tasks (poll_url, poll_interval_seconds)"
                        " select unnest(%s::text[]), 1 returning task_id", (urls,)).fetchall()
    return [str(r["task_id"]) for r in rows]


def taskman(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=90)


# --- the worker ------------------------------------------------------------------------------


def test_worker_finishes_every_task_and_picks_up_new_ones_at_once(pooled: Arrangement, conn,
                                                                  remote, workers) -> None:
    paths = [f"/jobs/{i}" for i in range(40)]
    process = start_worker_process(pooled.database_url, **pooled.settings,
                                   TASKMAN_PER_HOST_CONCURRENCY="20")
    workers.append(process)
    insert_tasks(conn, [remote.script(p, RUNNING, RUNNING, DONE) for p in paths])
    wait_until(lambda: count_status(conn, "completed") == 40, timeout=40)
    assert [p for p in paths if len(remote.hits(p)) != 3] == []

    # Nothing is due now, so the worker would sleep 5 s: only NOTIFY, or (polling) a look
    # at the due index, brings a new task's first poll within a second.
    for i in range(3):
        time.sleep(0.3)
        created = time.monotonic()
        insert_tasks(conn, [remote.script(f"/new/{i}", DONE)])
        (hit,) = wait_until(lambda i=i: remote.hits(f"/new/{i}"), timeout=10)
        assert hit.at - created < 1.5, f"picked up after {hit.at - created:.2f}s"

    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 15) == 0
    log = process.stderr.read()
    assert "Traceback" not in log and "prepared statement" not in log
    assert log.count("checking for new tasks every 0.2s") == (1 if pooled.polls else 0)


def test_the_pooler_killed_and_restarted_under_300_live_tasks(server_url, database_url, conn,
                                                              remote, workers) -> None:
    require_pgbouncer()
    with PgBouncer(server_url, "transaction") as pooler:
        url = pooler.through(database_url)
        settings = {"TASKMAN_DATABASE_POOL_MODE": "transaction",
                    "TASKMAN_CHANGE_CHECK_INTERVAL": CHANGE_CHECK_INTERVAL}
        worker = start_worker_process(url, **settings, TASKMAN_LEASE_SECONDS="5",
                                      TASKMAN_CONCURRENCY="100",
                                      TASKMAN_PER_HOST_CONCURRENCY="100")
        workers.append(worker)
        paths = [f"/jobs/{i}" for i in range(300)]
        slow_running = Reply(delay=0.2, json={"status": "running"})
        slow_done = Reply(delay=0.2, json={"status": "done"})
        # The edge checks new tasks' URLs with the worker's policy (the remote is on 127.0.0.1).
        with serve_edge(url, **settings, TASKMAN_ALLOW_PRIVATE_NETWORKS="true") as edge, \
                edge.client() as http:
            task_ids = insert_tasks(conn, [remote.script(p, slow_running, slow_done)
                                           for p in paths])
            wait_until(lambda: sum(len(remote.hits(p)) for p in paths) >= 150, timeout=30)
            pooler.kill()
            assert http.get(f"/tasks/{task_ids[0]}", timeout=20).status_code == 503
            time.sleep(1)
            pooler.start()

            wait_until(lambda: count_status(conn, "completed") == 300, timeout=60)
            assert worker.poll() is None, "the worker exited"
            wait_until(lambda: http.get(f"/tasks/{task_ids[0]}").status_code == 200, timeout=15)
            stream = Listener(edge.url, API_KEY)
            stream.wait_connected()
            new = http.post("/tasks", json={"poll_url": remote.script("/after", DONE)})
            assert stream.next_event()["task_id"] == new.json()["task_id"]
            stream.close()
    endings = conn.execute(
        "select task_id, count(*) as n from taskman.task_events where to_status = 'completed'"
        " and task_id = any(%s::uuid[]) group by task_id", (task_ids,)).fetchall()
    assert len(endings) == 300 and {r["n"] for r in endings} == {1}


# --- the CLI and migrations --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_task_commands_through_the_pooler(mode, poolers, database_url) -> None:
    env = {"DATABASE_URL": poolers[mode].through(database_url),
           "TASKMAN_DATABASE_POOL_MODE": mode}
    created = taskman(env, "create", "--poll-url", "https://api.example.com/jobs/1", "--json")
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.split('"task_id": "')[1].split('"')[0]
    assert taskman(env, "status", task_id).returncode == 0
    assert task_id in taskman(env, "list", "--status", "pending").stdout
    assert "cancelled" in taskman(env, "cancel", task_id).stdout
    assert "pending" in taskman(env, "retry", task_id).stdout


@contextmanager
def empty_database(server_url: str) -> Iterator[str]:
    name = f"taskman_empty_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f"create database {name}")
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f"drop database if exists {name} with (force)")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_migrate_through_the_pooler_twice_at_once_applies_each_migration_once(
        mode, poolers, server_url) -> None:
    with empty_database(server_url) as url:
        env = {**os.environ, "DATABASE_URL": poolers[mode].through(url),
               "TASKMAN_DATABASE_POOL_MODE": mode}
        runs = [subprocess.Popen([sys.executable, "-m", "worker.cli", "migrate"], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        outputs = [run.communicate(timeout=120) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        applied = [line.split()[1] for out, _ in outputs for line in out.splitlines()
                   if line.startswith("applied ")]
        expected = [m.version for m in list_migrations()]
        assert sorted(applied) == expected
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as c:
            recorded = [r["version"] for r in c.execute(
                "select version from supabase_migrations.schema_migrations order by 1")]
            assert recorded == expected
            assert c.execute("select taskman.create_task() as t").fetchone()["t"]["task_id"]


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "mode"), [
    (f"{POOLER_URL}:6543/postgres", "transaction"),
    (f"{POOLER_URL}:5432/postgres", "session"),
    ("postgresql://postgres:s3cret@db.abcdefghij.supabase.co:5432/postgres", "session"),
    ("postgresql://postgres:s3cret@db.abcdefghij.supabase.co/postgres", "session"),
    ("host=supabase.internal port=6543 dbname=postgres", "transaction"),  # self-hosted
    ("postgresql://a.example.com:5432,b.example.com:6543/postgres", "transaction"),
    ("postgresql:///taskman?host=/var/run/postgresql", "session"),
])
def test_pool_mode_is_detected_from_the_url(url, mode) -> None:
    assert detect_pool_mode(url) == mode


def test_the_pool_mode_setting_overrides_detection_and_picks_where_to_listen() -> None:
    pooled = f"{POOLER_URL}:6543/postgres"
    direct = "postgresql://postgres:s3cret@db.abcdefghij.supabase.co:5432/postgres"
    assert Connections.resolve(pooled) == Connections(pooled, "transaction", None)
    assert Connections.resolve(pooled, "auto", direct).listen_conninfo == direct
    assert Connections.resolve(direct).listen_conninfo == direct
    assert Connections.resolve(direct, "transaction").pool_mode == "transaction"
    assert Connections.resolve(direct, "transaction").connection_kwargs == {
        "prepare_threshold": None}
    assert Connections.resolve(pooled, "session").connection_kwargs == {}
    settings = Settings(_env_file=None, TASKMAN_DATABASE_POOL_MODE=" Transaction ")
    assert settings.database_pool_mode == "transaction"


def test_bad_connection_settings_are_refused_with_the_setting_named() -> None:
    with pytest.raises(ValidationError, match="TASKMAN_DATABASE_POOL_MODE"):
        Settings(_env_file=None, TASKMAN_DATABASE_POOL_MODE="statement")
    with pytest.raises(ValidationError, match="TASKMAN_CHANGE_CHECK_INTERVAL"):
        Settings(_env_file=None, TASKMAN_CHANGE_CHECK_INTERVAL="0")
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not a PostgreSQL URL"):
        Connections.resolve("not a url")


def test_a_transaction_pooler_listen_url_is_refused_at_start(database_url) -> None:
    process = start_worker_process(
        database_url, TASKMAN_LISTEN_DATABASE_URL=f"{POOLER_URL}:6543/postgres")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "TASKMAN_LISTEN_DATABASE_URL must keep a session" in stderr
    assert "direct connection" in stderr and "session pooler" in stderr
    assert "s3cret" not in stderr


def test_polled_changes_arrive_once_even_when_committed_out_of_order() -> None:
    def row(event_id: int, change: bool = True) -> dict:
        return {"event_id": event_id, "task_id": f"t{event_id}", "status": "pending",
                "user_id": None, "change": change}

    cursor = ChangeCursor(after=10)
    # 11 and 13 are not committed yet; 12 is a poll, which /events does not announce.
    assert [e["task_id"] for e in cursor.advance([row(12, False), row(14)], now=0)] == ["t14"]
    assert (cursor.after, cursor.missing) == (14, [11, 13])
    assert [e["task_id"] for e in cursor.advance([row(13)], now=1)] == ["t13"]
    assert cursor.missing == [11]
    assert cursor.advance([], now=MISSING_SECONDS + 1) == []  # 11 was rolled back
    assert cursor.missing == []

