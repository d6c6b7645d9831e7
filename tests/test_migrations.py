"""Migrations apply from scratch, re-apply as a no-op, and are tracked like the Supabase CLI."""

from __future__ import annotations

import psycopg

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
