"""Migrations apply from scratch, re-apply as a no-op, and are tracked like the Supabase CLI."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import database_before
from worker.migrate import COMPAT_SQL, list_migrations, migrate


def test_reapplying_migrations_is_a_no_op(database_url: str) -> None:
    assert migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        versions = [r[0] for r in conn.execute(
            "select version from supabase_migrations.schema_migrations order by version")]
    assert versions == [m.version for m in list_migrations()]


def test_compat_script_is_safe_to_run_twice(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(COMPAT_SQL.read_text())
        conn.execute(COMPAT_SQL.read_text())
        roles = {r[0] for r in conn.execute(
            "select rolname from pg_roles where rolname in "
            "('anon', 'authenticated', 'service_role', 'authenticator')")}
    assert roles == {"anon", "authenticated", "service_role", "authenticator"}


def test_a_failing_migration_leaves_nothing_half_applied(database_url: str, tmp_path) -> None:
    (tmp_path / "20990101000000_good.sql").write_text("create table public.good_one (id int);")
    (tmp_path / "20990101000100_bad.sql").write_text(
        "create table public.half_done (id int);\nselect 1 / 0;")
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(database_url, tmp_path)
    with psycopg.connect(database_url) as conn:
        tables = {r[0] for r in conn.execute(
            "select tablename from pg_tables where tablename in ('good_one', 'half_done')")}
        recorded = {r[0] for r in conn.execute(
            "select version from supabase_migrations.schema_migrations where version like '2099%'")}
    assert tables == {"good_one"}
    assert recorded == {"20990101000000"}
    # Once fixed, the failed migration applies on the next run.
    (tmp_path / "20990101000100_bad.sql").write_text("create table public.half_done (id int);")
    assert [m.name for m in migrate(database_url, tmp_path)] == ["bad"]


def test_the_submit_migration_upgrades_a_database_with_tasks_in_it(server_url: str,
                                                                   tmp_path) -> None:
    """Tasks made before submit, priority and heartbeats go on as before afterwards."""
    with database_before(server_url, "20261201001100", tmp_path) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            polled = conn.execute(
                "select taskman.create_task(poll_url => 'https://api.example.com/1',"
                " poll_headers => '{\"X-Key\": \"old\"}') ->> 'task_id'").fetchone()[0]
            waiting = conn.execute("select taskman.create_task(callback_url =>"
                                   " 'https://hooks.example.com/1') ->> 'task_id'").fetchone()[0]
        assert [m.version for m in migrate(url)][:1] == ["20261201001100"]  # then later ones
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute("select task_id::text, priority, submit_url, submitted_at"
                                " from taskman.tasks order by task_id").fetchall()
            assert {r[0] for r in rows} == {polled, waiting}
            assert all(r[1:] == (0, None, None) for r in rows)
            claimed = conn.execute("select task_id::text, poll_headers, submit_url from"
                                   " taskman.claim_due_tasks('w', 10, 60)").fetchall()
            assert claimed == [(polled, {"X-Key": "old"}, None)]
            new = conn.execute("select taskman.create_task(submit_url =>"
                               " 'https://api.example.com/jobs', priority => 3)").fetchone()[0]
            assert new["priority"] == 3 and new["submit_method"] == "POST"
