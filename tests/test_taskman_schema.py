"""Taskman lives in schema taskman: it installs beside a project's own objects, and a
database that ran the earlier migrations (objects in public) is moved there intact."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.factories import USER_A
from worker.migrate import migrate

BEFORE = Path(__file__).parent / "fixtures" / "migrations_before_taskman_schema"
SCHEMAS = ("public", "taskman", "taskman_private")
SECRET = {"Authorization": "Bearer sk-before-the-move"}


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A database with nothing of Taskman's in it."""
    name = f"taskman_schema_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


def _connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def _acl(column: str) -> str:
    """An ACL column as sorted text: grant order is not a difference."""
    return f"array(select unnest({column})::text order by 1) as acl"


def _catalog(url: str) -> dict[str, list[dict]]:
    """Everything about Taskman's objects that a migration decides, in a comparable form."""
    scope = ("(select oid from pg_namespace"
             " where nspname in ('public', 'taskman', 'taskman_private'))")
    tables = f"(select oid from pg_class where relnamespace in {scope})"
    queries = {
        "relations": "select c.relnamespace::regnamespace::text as schema, c.relname,"
                     f" c.relkind, c.relrowsecurity, {_acl('c.relacl')} from pg_class c"
                     f" where c.relnamespace in {scope} order by 1, 2",
        "columns": "select a.attrelid::regclass::text as rel, a.attname,"
                   " format_type(a.atttypid, a.atttypmod), a.attnotnull,"
                   f" pg_get_expr(d.adbin, d.adrelid) as default, {_acl('a.attacl')}"
                   " from pg_attribute a left join pg_attrdef d"
                   " on d.adrelid = a.attrelid and d.adnum = a.attnum"
                   f" where a.attrelid in {tables} and a.attnum > 0 and not a.attisdropped"
                   " order by 1, 2",
        "constraints": "select conrelid::regclass::text as rel, conname, pg_get_constraintdef(oid)"
                       f" from pg_constraint where connamespace in {scope} order by 1, 2",
        "indexes": "select indexrelid::regclass::text as name, pg_get_indexdef(indexrelid)"
                   f" from pg_index where indrelid in {tables} order by 1",
        "policies": "select schemaname, tablename, policyname, roles::text, cmd, qual, with_check"
                    " from pg_policies where schemaname in ('public', 'taskman', 'taskman_private')"
                    " order by 1, 2, 3",
        "triggers": "select tgrelid::regclass::text as rel, tgname, pg_get_triggerdef(oid)"
                    " from pg_trigger where not tgisinternal"
                    f" and tgrelid in {tables} order by 1, 2",
        "functions": "select p.oid::regprocedure::text as fn, pg_get_functiondef(p.oid),"
                     f" {_acl('p.proacl')} from pg_proc p where p.pronamespace in {scope}"
                     " order by 1",
        "schemas": f"select nspname, {_acl('nspacl')} from pg_namespace"
                   " where nspname in ('public', 'taskman', 'taskman_private') order by 1",
        "publication": "select schemaname, tablename from pg_publication_tables"
                       " where pubname = 'supabase_realtime' order by 1, 2",
    }
    with _connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in queries.items()}


def _taskman_objects_in_public(url: str) -> list[str]:
    with _connect(url) as conn:
        return [r["name"] for r in conn.execute(
            "select c.relname as name from pg_class c where c.relnamespace = 'public'::regnamespace"
            " union all select p.proname from pg_proc p"
            " where p.pronamespace = 'public'::regnamespace")]


def _fill_before_the_move(url: str) -> dict[str, str]:
    """Tasks as the earlier schema held them: a secret header, a finished one with
    history and a pending callback delivery."""
    with _connect(url) as conn:
        polled = conn.execute(
            "select public.create_task(poll_url => 'https://api.example.com/a',"
            " poll_headers => %s, callback_url => 'https://hooks.example.com/a') as t",
            (json.dumps(SECRET),)).fetchone()["t"]
        conn.execute("select * from public.claim_due_tasks('w1', 10, 60)")
        outcome = {"task_id": polled["task_id"], "worker_id": "w1", "ok": True,
                   "status": "completed", "result": {"rows": 3}}
        conn.execute("select * from public.record_poll_results(%s)", (json.dumps([outcome]),))
        with conn.transaction():
            conn.execute("set local role authenticated")
            conn.execute("select set_config('request.jwt.claims', %s, true)",
                         (json.dumps({"role": "authenticated", "sub": USER_A}),))
            waiting = conn.execute(
                "select public.create_task(task_type => 'report') as t").fetchone()["t"]
    return {"polled": polled["task_id"], "waiting": waiting["task_id"],
            "token": waiting["callback_token"]}


def test_a_database_on_the_earlier_schema_moves_with_its_tasks_history_and_secrets(
    empty_database: str,
) -> None:
    migrate(empty_database, BEFORE)
    ids = _fill_before_the_move(empty_database)
    with _connect(empty_database) as conn:
        events_before = conn.execute(
            "select event_id, task_id, event_type from public.task_events order by event_id"
        ).fetchall()

    applied = migrate(empty_database)

    assert applied and applied[0].name == "taskman_schema"
    assert _taskman_objects_in_public(empty_database) == []
    with _connect(empty_database) as conn:
        polled = conn.execute("select * from taskman.tasks where task_id = %s",
                              (ids["polled"],)).fetchone()
        assert (polled["status"], polled["result"]) == ("completed", {"rows": 3})
        waiting = conn.execute("select * from taskman.tasks where task_id = %s",
                               (ids["waiting"],)).fetchone()
        assert str(waiting["user_id"]) == USER_A
        assert conn.execute(
            "select event_id, task_id, event_type from taskman.task_events order by event_id"
        ).fetchall() == events_before
        secret = conn.execute("select poll_headers from taskman_private.task_private"
                              " where task_id = %s", (ids["polled"],)).fetchone()
        assert secret["poll_headers"] == SECRET
        assert conn.execute("select count(*) as n from taskman_private.outbox"
                            " where task_id = %s", (ids["polled"],)).fetchone()["n"] == 1
        # The moved functions work on the moved tables, and the old token still reports.
        conn.execute("select taskman.create_task(poll_url => 'https://api.example.com/b')")
        with conn.transaction():
            conn.execute("set local role anon")
            conn.execute("select set_config('request.jwt.claims', '{\"role\": \"anon\"}', true)")
            conn.execute("select taskman.update_task(%s, status => 'completed',"
                         " callback_token => %s)", (ids["waiting"], ids["token"]))
        assert conn.execute("select status from taskman.tasks where task_id = %s",
                            (ids["waiting"],)).fetchone()["status"] == "completed"


def test_moving_and_installing_afresh_give_the_same_schema(
    empty_database: str, database_url: str,
) -> None:
    migrate(empty_database, BEFORE)
    migrate(empty_database)
    moved, fresh = _catalog(empty_database), _catalog(database_url)
    for part in fresh:
        assert moved[part] == fresh[part], part


def test_taskman_installs_beside_a_projects_own_tasks_and_create_task(
    empty_database: str,
) -> None:
    with _connect(empty_database) as conn:
        conn.execute("create table public.tasks (id serial primary key, title text not null)")
        conn.execute("create table public.task_events (id serial primary key,"
                     " task_id int references public.tasks)")
        conn.execute("create function public.create_task(title text) returns int"
                     " language sql as $$ insert into public.tasks (title) values (title)"
                     " returning id $$")
        conn.execute("select public.create_task('buy milk')")
    before = _catalog(empty_database)

    migrate(empty_database)

    after = _catalog(empty_database)
    for part in ("relations", "columns", "constraints", "indexes", "triggers", "functions"):
        mine = [r for r in after[part] if "public" in json.dumps(r, default=str)
                and "taskman" not in json.dumps(r, default=str)]
        theirs = [r for r in before[part] if "public" in json.dumps(r, default=str)]
        assert mine == theirs, part
    with _connect(empty_database) as conn:
        assert conn.execute("select title from public.tasks").fetchall() == [
            {"title": "buy milk"}]
        assert conn.execute("select public.create_task('call mum') as id").fetchone()["id"] == 2
        task = conn.execute("select taskman.create_task(poll_url => 'https://api.example.com/x')"
                            " as t").fetchone()["t"]
        assert conn.execute("select count(*) as n from taskman.tasks where task_id = %s",
                            (task["task_id"],)).fetchone()["n"] == 1
        assert conn.execute("select count(*) as n from public.tasks").fetchone()["n"] == 2


def test_nothing_of_taskman_is_left_in_public(database_url: str) -> None:
    assert _taskman_objects_in_public(database_url) == []


def test_without_realtime_a_new_install_leaves_taskman_tasks_unpublished(
        database_url: str) -> None:
    with _connect(database_url) as conn:
        published = conn.execute("select schemaname, tablename from pg_publication_tables"
                                 " where pubname = 'supabase_realtime'").fetchall()
        mode = conn.execute("select taskman.realtime_mode() as m").fetchone()["m"]
    assert (published, mode) == ([], "none")
