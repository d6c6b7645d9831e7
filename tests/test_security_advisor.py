"""Supabase's Security Advisor (its database linter) on a fresh install with taskman
exposed: its lints as the Supabase CLI ships them, run for real, and catalog checks of our
own for the lints of that linter the pinned CLI does not ship yet (each named), over the
schemas PostgREST exposes (public and taskman) and Taskman's own."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.factories import create_task
from tests.supabase_advisors import advisor_findings

EXPOSED = "('public'::regnamespace, 'taskman'::regnamespace)"
TASKMAN = "('taskman'::regnamespace, 'taskman_private'::regnamespace)"


def test_the_security_advisor_finds_nothing(database_url: str, tmp_path: Path) -> None:
    """Every lint of the Security Advisor, at WARN and ERROR level: no finding."""
    assert advisor_findings(database_url, "security", tmp_path) == []


def test_the_security_advisor_lints_the_taskman_schema(conn, database_url: str,
                                                       tmp_path: Path) -> None:
    """A table of taskman that signed-in users can read without RLS is found
    (rls_disabled_in_public): taskman is linted as an exposed schema, so the check above
    covers it."""
    conn.execute("create table taskman.unprotected (id integer primary key)")
    conn.execute("grant select on taskman.unprotected to authenticated")
    findings = advisor_findings(database_url, "security", tmp_path)
    assert [f["name"] for f in findings] == ["rls_disabled_in_public"]
    assert "taskman.unprotected" in findings[0]["detail"]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_no_security_definer_function_in_an_exposed_schema_is_executable_by(conn, role) -> None:
    """anon_security_definer_function_executable and
    authenticated_security_definer_function_executable."""
    flagged = conn.execute(
        "select p.oid::regprocedure::text as fn from pg_proc p"
        f" where p.prosecdef and p.pronamespace in {EXPOSED}"
        " and has_function_privilege(%s, p.oid, 'execute')", (role,)).fetchall()
    assert flagged == []


def test_every_function_pins_an_empty_search_path(conn) -> None:
    """function_search_path_mutable, over taskman_private too."""
    mutable = conn.execute(
        "select p.oid::regprocedure::text as fn from pg_proc p"
        f" where p.pronamespace in {TASKMAN}"
        """ and not coalesce(p.proconfig, '{}') && array['search_path=""']""").fetchall()
    assert mutable == []


def test_every_table_in_an_exposed_or_taskman_schema_has_rls(conn) -> None:
    """rls_disabled_in_public, whoever may read the table."""
    without = conn.execute(
        "select c.oid::regclass::text as rel from pg_class c"
        " where c.relkind in ('r', 'p') and c.relnamespace in ('public'::regnamespace,"
        " 'taskman'::regnamespace, 'taskman_private'::regnamespace)"
        " and not c.relrowsecurity").fetchall()
    assert without == []


def test_anon_can_read_no_table_or_view(conn) -> None:
    """pg_graphql_anon_table_exposed: nothing anon may select, so nothing of Taskman's shows
    in the GraphQL schema before sign-in (where pg_graphql is installed)."""
    readable = conn.execute(
        "select distinct c.oid::regclass::text as rel from pg_class c"
        " join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped"
        " where c.relkind in ('r', 'v', 'm', 'f') and c.relnamespace in ('public'::regnamespace,"
        " 'taskman'::regnamespace, 'taskman_private'::regnamespace)"
        " and has_column_privilege('anon', c.oid, a.attnum, 'select')").fetchall()
    assert readable == []


def test_no_view_in_an_exposed_schema_bypasses_rls(conn) -> None:
    """security_definer_view."""
    definer_views = conn.execute(
        "select c.oid::regclass::text as rel from pg_class c"
        f" where c.relkind = 'v' and c.relnamespace in {EXPOSED}"
        " and not coalesce(c.reloptions, '{}') && array['security_invoker=true',"
        " 'security_invoker=on', 'security_invoker=1']").fetchall()
    assert definer_views == []


def test_every_foreign_key_is_covered_by_an_index(conn) -> None:
    """unindexed_foreign_keys (an INFO of the Performance Advisor)."""
    uncovered = conn.execute(
        "select c.conrelid::regclass::text as rel, c.conname from pg_constraint c"
        f" where c.contype = 'f' and c.connamespace in {TASKMAN}"
        " and not exists (select 1 from pg_index i where i.indrelid = c.conrelid"
        " and (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)]"
        " = c.conkey)").fetchall()
    assert uncovered == []


def test_private_functions_run_only_for_the_roles_their_wrappers_serve(conn) -> None:
    """The API roles may execute in taskman_private only what the RPCs in taskman call:
    the definer implementations, the figures behind task_stats, the user check, the
    live poll figures task_json reads, the host overview and the callback secret's
    rotation (which check ownership themselves) and the value checks of the tasks' and
    events' CHECK constraints (pure predicates, evaluated as whoever writes the row, so
    executable by every role)."""
    rows = conn.execute(
        "select p.proname, has_function_privilege('anon', p.oid, 'execute') as anon,"
        " has_function_privilege('authenticated', p.oid, 'execute') as authenticated"
        " from pg_proc p where p.pronamespace = 'taskman_private'::regnamespace"
        " and (has_function_privilege('anon', p.oid, 'execute')"
        "      or has_function_privilege('authenticated', p.oid, 'execute'))").fetchall()
    grants = {r["proname"]: (r["anon"], r["authenticated"]) for r in rows}
    user = (False, True)
    assert grants == {"create_task": user, "get_task_status": user, "cancel_task": user,
                      "retry_task": user, "task_stats": user, "update_task": (True, True),
                      "callback_profile": (True, True), "require_user": (True, True),
                      "poll_state": user, "host_status": user, "rotate_callback_secret": user,
                      "is_task_status": (True, True),
                      "is_error_code": (True, True), "is_event_type": (True, True)}


def test_a_role_of_its_own_can_write_tasks_through_their_checks(conn) -> None:
    """A worker or operator login that is neither service_role nor the owner still passes
    the CHECK constraints (their predicates run as whoever writes the row)."""
    task_id = create_task(conn)["task_id"]
    with conn.transaction(force_rollback=True):  # roles are the cluster's: leave none behind
        conn.execute("create role taskman_ops bypassrls")
        conn.execute("grant usage on schema taskman, taskman_private, auth to taskman_ops")
        conn.execute("grant select, update on taskman.tasks to taskman_ops")
        conn.execute("set local role taskman_ops")
        updated = conn.execute("update taskman.tasks set status = 'in_progress'"
                               " where task_id = %s returning status", (task_id,)).fetchall()
        assert updated == [{"status": "in_progress"}]
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute("update taskman.tasks set error_code = 'nonsense'")
