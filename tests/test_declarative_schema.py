"""supabase/schemas/ states the database the migrations build: a database made from the
schema files alone and one made by all migrations have the same catalog, object by object.

Compared, in schemas taskman, taskman_private and public: the schemas, tables (kind,
persistence, RLS, column order), columns, constraints, indexes, sequences, types, functions
(body, arguments, result, attributes, settings), triggers, policies, ACLs, default ACLs,
comments, publication membership, and the rows Taskman ships (built-in response profiles,
the retention cursor). Column order is the order of the live columns, not their attnum: a
column dropped by a migration leaves a gap in attnum that a fresh CREATE TABLE cannot
reproduce and nothing can observe, while the order itself decides what SELECT *, a row
type (taskman.tasks as a function argument) and a positional INSERT see. ACL entries are
compared as sets (without grantor), NULL as the default it stands for: grant order and an
explicit owner-only ACL are no difference.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import cloned_database
from worker.migrate import COMPAT_SQL

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "supabase" / "schemas"
# Taskman's schemas, and public: nothing of Taskman's belongs there, on either side.
COMPARED = "('taskman', 'taskman_private', 'public')"
NSP = f"(select oid from pg_namespace where nspname in {COMPARED})"
RELATION_KIND = "case c.relkind when 'S' then 's'::\"char\" else 'r' end"
RELS = f"(select oid from pg_class where relnamespace in {NSP})"


def _acl(column: str, kind: str, owner: str) -> str:
    """An ACL as a sorted array of grantee:privilege[*], NULL read as its default
    (``kind``: the acldefault object type, an SQL expression)."""
    return (f"array(select coalesce(nullif(x.grantee::regrole::text, '-'), 'PUBLIC') || ':'"
            f" || x.privilege_type || case when x.is_grantable then '*' else '' end"
            f" from aclexplode(coalesce({column}, acldefault({kind}, {owner}))) x"
            f" order by 1)")


# Each query yields (object, property columns...): the object names what differs.
QUERIES = {
    "schema": f"""
        select 'schema ' || n.nspname, n.nspowner::regrole::text as owner,
               {_acl('n.nspacl', "'n'", 'n.nspowner')} as acl,
               obj_description(n.oid, 'pg_namespace') as comment
        from pg_namespace n where n.oid in {NSP}""",
    "relation": f"""
        select 'relation ' || c.oid::regclass::text, c.relkind, c.relpersistence,
               c.relrowsecurity, c.relforcerowsecurity, c.relreplident, c.reloptions,
               c.relowner::regrole::text as owner,
               {_acl('c.relacl', RELATION_KIND, 'c.relowner')}
                 as acl,
               obj_description(c.oid, 'pg_class') as comment,
               case when c.relkind in ('v', 'm') then pg_get_viewdef(c.oid) end as view,
               array(select a.attname::text from pg_attribute a where a.attrelid = c.oid
                     and a.attnum > 0 and not a.attisdropped order by a.attnum) as column_order
        from pg_class c where c.oid in {RELS} and c.relkind not in ('i', 'I')""",
    "column": f"""
        select 'column ' || a.attrelid::regclass::text || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod) as type, a.attnotnull as not_null,
               pg_get_expr(d.adbin, d.adrelid) as default, a.attidentity as identity,
               a.attgenerated as generated, a.attcollation::regcollation::text as collation,
               case when a.attacl is not null
                    then {_acl('a.attacl', "'c'", 'c.relowner')} end as acl,
               col_description(a.attrelid, a.attnum) as comment
        from pg_attribute a join pg_class c on c.oid = a.attrelid
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where a.attrelid in {RELS} and c.relkind not in ('i', 'I', 'S')
          and a.attnum > 0 and not a.attisdropped""",
    "constraint": f"""
        select 'constraint ' || coalesce(c.conrelid::regclass::text, c.contypid::regtype::text)
               || '.' || c.conname, c.contype, pg_get_constraintdef(c.oid) as definition,
               c.convalidated as validated, c.connoinherit as no_inherit,
               obj_description(c.oid, 'pg_constraint') as comment
        from pg_constraint c where c.connamespace in {NSP}""",
    "index": f"""
        select 'index ' || i.indexrelid::regclass::text,
               pg_get_indexdef(i.indexrelid) as definition,
               i.indisprimary as primary, i.indisclustered as clustered,
               i.indisreplident as replica_identity,
               obj_description(i.indexrelid, 'pg_class') as comment
        from pg_index i where i.indrelid in {RELS}""",
    "sequence": f"""
        select 'sequence ' || s.seqrelid::regclass::text, s.seqtypid::regtype::text as type,
               s.seqstart as start, s.seqincrement as increment, s.seqmin as min,
               s.seqmax as max, s.seqcache as cache, s.seqcycle as cycle,
               (select d.refobjid::regclass::text || '.' || a.attname from pg_depend d
                join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                where d.classid = 'pg_class'::regclass and d.objid = s.seqrelid
                  and d.deptype in ('a', 'i')) as owned_by
        from pg_sequence s where s.seqrelid in {RELS}""",
    "type": f"""
        select 'type ' || t.oid::regtype::text, t.typtype, t.typbasetype::regtype::text as base,
               t.typnotnull as not_null, t.typdefault as default,
               array(select e.enumlabel::text from pg_enum e where e.enumtypid = t.oid
                     order by e.enumsortorder) as labels,
               {_acl('t.typacl', "'T'", 't.typowner')} as acl,
               obj_description(t.oid, 'pg_type') as comment
        from pg_type t where t.typnamespace in {NSP} and t.typrelid = 0
          and t.typelem = 0""",
    "function": f"""
        select 'function ' || p.oid::regprocedure::text, p.prokind as kind,
               pg_get_function_arguments(p.oid) as arguments,
               pg_get_function_result(p.oid) as result, l.lanname as language,
               p.provolatile as volatility, p.proisstrict as strict,
               p.prosecdef as security_definer, p.proleakproof as leakproof,
               p.proparallel as parallel, p.procost as cost, p.prorows as rows,
               array(select unnest(p.proconfig) order by 1) as settings,
               p.proowner::regrole::text as owner,
               {_acl('p.proacl', "'f'", 'p.proowner')} as acl,
               obj_description(p.oid, 'pg_proc') as comment, p.prosrc as body
        from pg_proc p join pg_language l on l.oid = p.prolang
        where p.pronamespace in {NSP}""",
    "trigger": f"""
        select 'trigger ' || g.tgrelid::regclass::text || '.' || g.tgname,
               pg_get_triggerdef(g.oid) as definition, g.tgenabled as enabled,
               obj_description(g.oid, 'pg_trigger') as comment
        from pg_trigger g where g.tgrelid in {RELS} and not g.tgisinternal""",
    "policy": f"""
        select 'policy ' || p.polrelid::regclass::text || '.' || quote_ident(p.polname),
               p.polcmd as command,
               p.polpermissive as permissive,
               array(select case r when 0 then 'PUBLIC' else r::regrole::text end
                     from unnest(p.polroles) r order by 1) as roles,
               pg_get_expr(p.polqual, p.polrelid) as using,
               pg_get_expr(p.polwithcheck, p.polrelid) as with_check,
               obj_description(p.oid, 'pg_policy') as comment
        from pg_policy p where p.polrelid in {RELS}""",
    "publication": f"""
        select 'publication ' || p.pubname || ' table ' || r.prrelid::regclass::text,
               r.prattrs::text as columns, pg_get_expr(r.prqual, r.prrelid) as row_filter
        from pg_publication_rel r join pg_publication p on p.oid = r.prpubid
        where r.prrelid in {RELS}
        union all
        select 'publication ' || p.pubname || ' schema ' || n.pnnspid::regnamespace::text,
               null, null
        from pg_publication_namespace n join pg_publication p on p.oid = n.pnpubid
        where n.pnnspid in {NSP}""",
    "default_acl": f"""
        select 'default privileges of ' || d.defaclrole::regrole::text || ' in '
               || d.defaclnamespace::regnamespace::text || ' on ' || d.defaclobjtype::text,
               d.defaclacl::text as acl
        from pg_default_acl d where d.defaclnamespace in {NSP}""",
    "rows": """
        select 'rows of taskman.response_profiles (built-in)',
               array(select to_jsonb(r)::text from taskman.response_profiles r
                     where r.builtin order by r.name) as rows
        union all
        select 'rows of taskman_private.retention_state',
               array(select to_jsonb(r)::text from taskman_private.retention_state r) as rows""",
}


def catalog(url: str) -> dict[str, dict[str, Any]]:
    """Taskman's objects in the database at ``url``: {object: {property: value}}."""
    found: dict[str, dict[str, Any]] = {}
    with psycopg.connect(url) as conn:
        for query in QUERIES.values():
            cur = conn.execute(query)
            names = [c.name for c in cur.description or []][1:]
            for row in cur:
                found[row[0]] = dict(zip(names, row[1:], strict=True))
    return found


def _describe(prop: str, built: Any, migrated: Any) -> str:
    if isinstance(built, str) and isinstance(migrated, str) and "\n" in built + migrated:
        diff = difflib.unified_diff(migrated.splitlines(), built.splitlines(),
                                    "migrations", "schemas", lineterm="", n=1)
        return f"  {prop}:\n" + "\n".join(f"    {line}" for line in list(diff)[:40])
    return f"  {prop}: migrations {migrated!r}, schemas {built!r}"


def differences(built: dict[str, dict[str, Any]],
                migrated: dict[str, dict[str, Any]]) -> list[str]:
    """What differs, one entry an object, naming it and how."""
    found = []
    for name in sorted(built.keys() | migrated.keys()):
        if name not in built:
            found.append(f"{name}: in the migrations, missing from supabase/schemas")
        elif name not in migrated:
            found.append(f"{name}: in supabase/schemas, not made by the migrations")
        else:
            props = [_describe(p, built[name][p], migrated[name][p])
                     for p in built[name] if built[name][p] != migrated[name][p]]
            if props:
                found.append(f"{name} differs:\n" + "\n".join(props))
    return found


def apply_schemas(url: str, directory: Path = SCHEMAS_DIR) -> None:
    """Build Taskman from the schema files alone, in lexical order, as the Supabase CLI
    reads them (after the compat script: the server is plain PostgreSQL)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(COMPAT_SQL.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.sql")):
            try:
                conn.execute(path.read_text(encoding="utf-8"))
            except psycopg.Error as error:
                raise AssertionError(f"{path.name} does not apply: {error}") from error


@pytest.fixture
def declarative_url(server_url: str) -> Iterator[str]:
    """A database built from supabase/schemas/ alone."""
    name = f"taskman_declarative_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")
        conn.execute(f"create database {name}")
    try:
        url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
        apply_schemas(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


def test_the_schema_files_build_what_the_migrations_build(server_url: str,
                                                          declarative_url: str) -> None:
    with cloned_database(server_url, "migrated") as migrated_url:
        migrated = catalog(migrated_url)
    found = differences(catalog(declarative_url), migrated)
    assert not found, (
        f"{len(found)} objects differ between supabase/schemas and supabase/migrations"
        " (change both: the schema file states the object, a new migration gets deployed"
        " databases there):\n" + "\n".join(found))


def test_the_comparison_names_the_object_that_differs(declarative_url: str) -> None:
    """A change on one side only is caught and named: a function body, a policy, a grant,
    a column."""
    before = catalog(declarative_url)
    with psycopg.connect(declarative_url, autocommit=True) as conn:
        conn.execute("create or replace function taskman_private.is_task_status(value text)"
                     " returns boolean language sql immutable set search_path = ''"
                     " as $$ select value = 'pending' $$")
        conn.execute("alter policy \"Owners read their tasks\" on taskman.tasks using (true)")
        conn.execute("grant execute on function taskman.release_tasks to authenticated")
        conn.execute("alter table taskman.tasks add column note text")
    found = differences(catalog(declarative_url), before)
    assert [entry.split("\n")[0] for entry in found] == [
        "column taskman.tasks.note: in supabase/schemas, not made by the migrations",
        "function taskman.release_tasks(text) differs:",
        "function taskman_private.is_task_status(text) differs:",
        'policy taskman.tasks."Owners read their tasks" differs:',
        "relation taskman.tasks differs:",
    ]
    report = "\n".join(found)
    assert "  using: migrations '(user_id = ( SELECT auth.uid() AS uid))', schemas 'true'" in report
    assert "    + select value = 'pending' " in report
