"""The ``taskman`` command line, run as a user runs it: a subprocess against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest


def taskman(database_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, **settings}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_create_status_list_cancel_retry_round_trip(database_url) -> None:
    created = taskman(database_url, "create", "--poll-url", "https://api.example.com/jobs/1",
                      "--type", "report", "--header", "Authorization: Bearer s3cret",
                      "--metadata", '{"customer": 7}', "--json")
    assert created.returncode == 0, created.stderr
    task = json.loads(created.stdout)
    assert task["status"] == "pending" and task["callback_token"]
    assert "s3cret" not in created.stdout

    status = taskman(database_url, "status", task["task_id"], "--json")
    assert json.loads(status.stdout)["metadata"] == {"customer": 7}

    listing = taskman(database_url, "list", "--status", "pending")
    assert task["task_id"] in listing.stdout and "STATUS" in listing.stdout

    cancelled = taskman(database_url, "cancel", task["task_id"], "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    retried = taskman(database_url, "retry", task["task_id"])
    assert retried.returncode == 0 and "pending" in retried.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["create", "--poll-url", "ftp://files.example.com/x"], "poll_url"),
    (["create", "--config", "{not json"], "--config must be JSON"),
    (["create", "--header", "no-colon"], "header must look like"),
    (["create", "--timeout-minutes", "-5"], "timeout_minutes"),
    (["create", "--callback-url", "http://localhost:5678/webhook-waiting/1"],
     "callback_url: localhost resolves to a non-public address"),
    (["create", "--poll-url", "http://10.0.0.1/jobs/1"], "add 10.0.0.1 (or 10.0.0.1:80) to "
     "TASKMAN_ALLOWED_HOSTS"),
    (["status", "not-a-task-id"], "is not a task id"),
    (["list", "--status", "sleeping"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2_with_a_message_and_changes_nothing(database_url, conn, args,
                                                              message) -> None:
    result = taskman(database_url, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 0


def test_create_applies_the_network_policy_of_its_settings(database_url) -> None:
    url = "http://localhost:5678/webhook-waiting/1"
    refused = taskman(database_url, "create", "--callback-url", url,
                      TASKMAN_ALLOWED_HOSTS="127.0.0.1")
    assert refused.returncode == 2 and "callback_url" in refused.stderr
    allowed = taskman(database_url, "create", "--callback-url", url, "--json",
                      TASKMAN_ALLOWED_HOSTS="127.0.0.1,localhost:5678")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["callback_url"] == url


def test_unknown_task_and_refused_transition_exit_1(database_url) -> None:
    missing = taskman(database_url, "status", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1 and "not found" in missing.stderr
    task = json.loads(taskman(database_url, "create", "--json").stdout)
    refused = taskman(database_url, "retry", task["task_id"])
    assert refused.returncode == 1 and "only failed or cancelled" in refused.stderr


def test_invalid_configuration_names_the_setting(database_url) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "TASKMAN_CONCURRENCY": "lots"}
    result = subprocess.run([sys.executable, "-m", "worker.cli", "list"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "TASKMAN_CONCURRENCY" in result.stderr


def test_migrate_reminds_to_expose_the_schema_until_postgrest_lists_it(database_url) -> None:
    unknown = taskman(database_url, "migrate")
    assert unknown.returncode == 0, unknown.stderr
    assert "database is up to date" in unknown.stdout
    assert "Exposed schemas" in unknown.stdout and "cannot tell" in unknown.stdout

    database = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"alter role authenticator in database {database}"
                     " set pgrst.db_schemas = 'public, graphql_public'")
        not_listed = taskman(database_url, "migrate")
        conn.execute(f"alter role authenticator in database {database}"
                     " set pgrst.db_schemas = 'public, graphql_public, taskman'")
        listed = taskman(database_url, "migrate")
        conn.execute(f"alter role authenticator in database {database} reset pgrst.db_schemas")
    assert "do not list it" in not_listed.stdout
    assert "Exposed schemas" not in listed.stdout


def test_notifications_lists_failing_and_given_up_deliveries(database_url, conn) -> None:
    from tests.factories import complete_with_unbounded_result, create_task
    from tests.remote_api import start_receiver
    from tests.test_outbox import dispatch, make_settings

    hook = start_receiver(status=500)
    try:
        ids = [create_task(conn, callback_url=f"{hook.url()}/{i}")["task_id"] for i in range(2)]
        complete_with_unbounded_result(conn, ids[0], "[" * 5000 + "]" * 5000)
        conn.execute("select taskman.update_task(%s, 'completed')", (ids[1],))
        settings = make_settings(TASKMAN_OUTBOX_MAX_ATTEMPTS=2)
        dispatch(database_url, settings)
        conn.execute("update taskman_private.outbox set next_attempt_at = now()"
                     " where task_id = %s", (ids[0],))
        dispatch(database_url, settings)
    finally:
        hook.stop()

    listed = json.loads(taskman(database_url, "notifications", "--json").stdout)
    assert {(r["task_id"], r["state"], r["attempts"]) for r in listed} == {
        (ids[0], "given_up", 2), (ids[1], "failing", 1)}
    given_up = json.loads(taskman(database_url, "notifications", "--given-up", "--json").stdout)
    assert [r["task_id"] for r in given_up] == [ids[0]]
    assert given_up[0]["last_error"].startswith("the task's JSON could not be read")
    table = taskman(database_url, "notifications", "--failing")
    assert table.returncode == 0 and ids[1] in table.stdout and "HTTP 500" in table.stdout
    assert ids[0] not in table.stdout
    assert "no failing" in taskman(database_url, "notifications", "--limit", "0").stdout


@pytest.mark.parametrize("command", ["worker", "edge"])
def test_worker_and_edge_refuse_to_start_on_a_database_that_lacks_migrations(
        server_url, tmp_path, command) -> None:
    # A new version deployed before `taskman migrate`: it says what to run, and exits.
    from tests.conftest import database_before
    from worker.migrate import list_migrations, migrate

    newest = list_migrations()[-1]
    with database_before(server_url, newest.version, tmp_path) as url:
        started = taskman(url, command, *(["--port", "0"] if command == "edge" else []))
        assert started.returncode == 2
        assert started.stderr.strip() == (
            f"taskman {command}: the database lacks 1 of Taskman's {len(list_migrations())}"
            f" migrations, from {newest.version}_{newest.name}: run `taskman migrate` (or"
            " `supabase db push`) first")
        assert [m.version for m in migrate(url)] == [newest.version]


@contextmanager
def _empty_database(server_url: str) -> Iterator[str]:
    """The URL of a new database without Taskman, dropped afterwards."""
    from tests.conftest import _with_database

    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("drop database if exists taskman_empty with (force)")
        admin.execute("create database taskman_empty")
    try:
        yield _with_database(server_url, "taskman_empty")
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute("drop database taskman_empty with (force)")


def test_the_worker_refuses_to_start_on_a_database_with_no_migrations(server_url) -> None:
    with _empty_database(server_url) as url:
        started = taskman(url, "worker")
        assert started.returncode == 2
        assert "the database has none of Taskman's migrations: run `taskman migrate`" in (
            started.stderr)
        with psycopg.connect(url) as conn:  # the look changed nothing
            assert conn.execute("select to_regnamespace('supabase_migrations')").fetchone() == (
                None,)


def test_a_database_that_recorded_taskman_under_versions_of_its_own_is_not_refused(
        database_url, conn) -> None:
    # Taskman's schema is there, the record holds none of its versions (the files were
    # applied under other names): nothing tells what is missing, so nothing is refused.
    from worker.migrate import list_migrations, pending_migrations

    newest = list_migrations()[-1].version
    assert pending_migrations(database_url) == []
    conn.execute("update supabase_migrations.schema_migrations set version = '1' || version")
    assert pending_migrations(database_url) == []
    conn.execute("update supabase_migrations.schema_migrations set version = substr(version, 2)"
                 " where version <> '1' || %s", (newest,))
    assert [m.version for m in pending_migrations(database_url)] == [newest]


def test_a_database_that_cannot_be_reached_gets_one_line_and_exit_2() -> None:
    unreachable = "postgresql://taskman@127.0.0.1:1/taskman"  # nothing listens on port 1
    for args in (["list"], ["migrate"], ["migrate", "--check"], ["prune", "--older-than", "7d"]):
        ran = taskman(unreachable, *args)
        assert ran.returncode == 2, ran.stderr
        assert ran.stderr.startswith(f"taskman {args[0]}: cannot reach the database: ")
        assert "Traceback" not in ran.stderr and len(ran.stderr.strip().splitlines()) == 1


def test_migrate_check_lists_what_is_pending_and_applies_nothing(server_url, tmp_path,
                                                                 database_url) -> None:
    from tests.conftest import database_before
    from worker.migrate import list_migrations

    current = taskman(database_url, "migrate", "--check")
    assert (current.returncode, current.stdout) == (0, "database is up to date\n")
    newest = list_migrations()[-1]
    with database_before(server_url, newest.version, tmp_path) as url:
        for _ in range(2):  # the second look finds the same: the first applied nothing
            behind = taskman(url, "migrate", "--check")
            assert (behind.returncode, behind.stdout) == (
                1, f"pending {newest.version} {newest.name}\n")


def test_a_command_on_a_database_without_taskman_says_to_migrate(server_url) -> None:
    with _empty_database(server_url) as url:
        ran = taskman(url, "list")
        assert ran.returncode == 2 and "Traceback" not in ran.stderr
        assert ran.stderr.startswith("taskman list: the database lacks Taskman's schema or some"
                                     " of its migrations (")
        assert ran.stderr.rstrip().endswith("run `taskman migrate` first")
