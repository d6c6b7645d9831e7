"""A new install carries task changes by Broadcast, and retention (on by default) deletes
finished tasks with everything of theirs; a database upgraded from a version whose
default was Postgres Changes keeps its mode; without Supabase Realtime the mode is none.

A Supabase project is emulated with its `realtime` schema in place before the
migrations run, as on a hosted project (tests/supabase_realtime.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import _postgrest, _with_database, cloned_database, database_before
from tests.factories import USER_A, create_task, task_row
from tests.supabase_realtime import emulate_supabase_realtime
from tests.test_cli import taskman
from tests.test_declarative_schema import apply_schemas, catalog, differences
from tests.test_retention import _finish, _left
from tests.worker_harness import worker_settings
from worker.migrate import migrate
from worker.polling.retention import Retention

VERSION = "20261208000100"  # broadcast_by_default
SUPABASE_TEMPLATE = f"taskman_supabase_template_{os.getpid()}"


def _mode(conn) -> str:
    return conn.execute("select taskman.realtime_mode() as m").fetchone()["m"]


def _published(conn) -> bool:
    return conn.execute("select count(*) as n from pg_publication_tables"
                        " where pubname = 'supabase_realtime' and schemaname = 'taskman'"
                        " and tablename = 'tasks'").fetchone()["n"] == 1


@pytest.fixture(scope="module")
def supabase_template(server_url: str) -> Iterator[str]:
    """A Supabase project's database (Realtime there first) on which Taskman was installed."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"drop database if exists {SUPABASE_TEMPLATE} with (force)")
        admin.execute(f"create database {SUPABASE_TEMPLATE}")
    url = _with_database(server_url, SUPABASE_TEMPLATE)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            emulate_supabase_realtime(conn)
        migrate(url)
        yield SUPABASE_TEMPLATE
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {SUPABASE_TEMPLATE} with (force)")


@pytest.fixture
def supabase_url(server_url: str, supabase_template: str) -> Iterator[str]:
    """A new install on a Supabase project, for one test."""
    with cloned_database(server_url, "supabase", supabase_template) as url:
        yield url


def _one_retention_round(url: str) -> int:
    """One round of the worker's retention job with the default settings (30 days)."""
    retention = Retention(worker_settings(url))
    assert retention.enabled

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
            return await retention.run_once(c)

    return asyncio.run(run())


def test_a_new_install_on_supabase_broadcasts_on_the_owners_private_topic(
        supabase_url: str) -> None:
    with psycopg.connect(supabase_url, autocommit=True, row_factory=dict_row) as conn:
        assert (_mode(conn), _published(conn)) == ("broadcast", False)
        assert taskman(supabase_url, "realtime").stdout.startswith("realtime: broadcast")
        with _postgrest(supabase_url) as api:
            task_id = api.rpc("authenticated", "create_task", USER_A,
                              poll_url="https://api.example.com/jobs/1")["task_id"]
        [sent] = conn.execute("select topic, event, private, payload ->> 'task_id' as task_id"
                              " from realtime.messages").fetchall()
        assert sent == {"topic": f"taskman:tasks:{USER_A}", "event": "INSERT",
                        "private": True, "task_id": task_id}


def test_by_default_retention_deletes_finished_tasks_with_everything_of_theirs(
        supabase_url: str) -> None:
    with psycopg.connect(supabase_url, autocommit=True, row_factory=dict_row) as conn:
        old = create_task(conn, poll_headers={"X-Key": "k"},
                          callback_url="https://hooks.example.com/a")["task_id"]
        _finish(conn, old, "40 days")
        conn.execute("update taskman_private.outbox set delivered_at = now()"
                     " where task_id = %s", (old,))
        recent = create_task(conn)["task_id"]
        _finish(conn, recent, "10 days")
        before = _left(conn, old)
        assert before["events"] and before["private"] and before["outbox"]
        sent = conn.execute("select count(*) as n from realtime.messages").fetchone()["n"]

        assert _one_retention_round(supabase_url) == 1
        assert task_row(conn, old) is None
        assert _left(conn, old) == {"events": 0, "private": 0, "schedule": 0, "outbox": 0}
        assert task_row(conn, recent) is not None  # within the 30 days
        # Deletes send nothing.
        assert conn.execute("select count(*) as n from realtime.messages").fetchone()["n"] == sent


def test_an_upgraded_supabase_project_keeps_postgres_changes_and_its_task_rows(
        server_url: str, tmp_path: Path) -> None:
    with database_before(server_url, VERSION, tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            emulate_supabase_realtime(conn)
            kept = create_task(conn)["task_id"]
            _finish(conn, kept, "40 days")
        assert VERSION in [m.version for m in migrate(url)]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert (_mode(conn), _published(conn)) == ("changes", True)
            assert _one_retention_round(url) == 1
            assert task_row(conn, kept)["status"] == "completed"  # the row stays
            assert conn.execute("select count(*) as n from realtime.messages"
                                ).fetchone()["n"] == 0


def test_an_upgrade_whose_tasks_were_all_pruned_keeps_its_mode(
        server_url: str, tmp_path: Path) -> None:
    with database_before(server_url, VERSION, tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            emulate_supabase_realtime(conn)
            create_task(conn)
            conn.execute("delete from taskman.tasks")  # as retention would, in time
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert (_mode(conn), _published(conn)) == ("changes", True)


def test_an_upgrade_that_never_made_a_task_is_a_new_install(
        server_url: str, tmp_path: Path) -> None:
    with database_before(server_url, VERSION, tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            emulate_supabase_realtime(conn)
            assert _mode(conn) == "changes"
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert (_mode(conn), _published(conn)) == ("broadcast", False)


def test_without_realtime_a_new_install_has_no_mode_and_retention_deletes_whole_tasks(
        conn, database_url: str) -> None:
    assert (_mode(conn), _published(conn)) == ("none", False)
    assert taskman(database_url, "realtime").stdout.startswith("realtime: none")
    old = create_task(conn)["task_id"]
    _finish(conn, old, "40 days")
    assert _one_retention_round(database_url) == 1
    assert task_row(conn, old) is None
    # Postgres Changes stays a choice: the publication is there.
    assert taskman(database_url, "realtime", "changes").stdout.startswith("realtime: changes")
    assert _published(conn)


def test_without_realtime_an_upgrade_keeps_its_mode_and_deletes_whole_tasks(
        server_url: str, tmp_path: Path) -> None:
    with database_before(server_url, VERSION, tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            old = create_task(conn)["task_id"]
            _finish(conn, old, "40 days")
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert (_mode(conn), _published(conn)) == ("changes", True)
            # No Realtime streams the table, so nothing holds its rows back.
            assert _one_retention_round(url) == 1
            assert task_row(conn, old) is None


def _realtime_objects(url: str) -> dict:
    """The catalog entries Realtime's presence decides: triggers and publication
    membership of Taskman's tables, and the Realtime functions."""
    return {name: props for name, props in catalog(url).items()
            if name.startswith(("trigger ", "publication ")) or "realtime" in name}


def test_the_schema_files_state_a_new_install_on_supabase(server_url: str,
                                                          supabase_url: str) -> None:
    name = f"taskman_supabase_declarative_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")
        admin.execute(f"create database {name}")
    url = _with_database(server_url, name)
    try:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            emulate_supabase_realtime(conn)
        apply_schemas(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            assert _mode(conn) == "broadcast"
            policies = conn.execute("select policyname from pg_policies"
                                    " where schemaname = 'realtime' order by 1").fetchall()
        # What Realtime's presence changes (the rest: tests/test_declarative_schema.py).
        assert differences(_realtime_objects(url), _realtime_objects(supabase_url)) == []
        with psycopg.connect(supabase_url, autocommit=True, row_factory=dict_row) as conn:
            assert conn.execute("select policyname from pg_policies"
                                " where schemaname = 'realtime' order by 1").fetchall() == policies
        assert len(policies) == 3
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")
