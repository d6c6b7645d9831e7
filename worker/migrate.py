"""Apply the Supabase migrations, tracked as the Supabase CLI tracks them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg

from worker import db, store

_REPO = Path(__file__).resolve().parent.parent
_PACKAGED = Path(__file__).resolve().parent / "_sql"


def _resource(relative: str, packaged: str) -> Path:
    """A SQL resource from the source tree, or from the wheel when installed."""
    source = _REPO / relative
    return source if source.exists() else _PACKAGED / packaged


MIGRATIONS_DIR = _resource("supabase/migrations", "migrations")
COMPAT_SQL = _resource("sql/supabase_compat.sql", "supabase_compat.sql")
# The schema clients call (supabase.schema('taskman')); PostgREST must expose it.
API_SCHEMA = "taskman"


@dataclass(frozen=True)
class Migration:
    """One file of ``supabase/migrations``: ``<version>_<name>.sql``."""

    version: str
    name: str
    path: Path


def list_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, oldest first."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        if not version.isdigit() or not name:
            raise ValueError(f"{path.name}: migration files are named <timestamp>_<name>.sql")
        found.append(Migration(version, name, path))
    return found


def api_schema_exposed(conninfo: str) -> bool | None:
    """Whether PostgREST is configured, in the database, to serve ``taskman``.

    None when the database does not say: Supabase keeps the Dashboard's list of exposed
    schemas outside it, unless someone set ``pgrst.db_schemas`` on ``authenticator``.
    """
    with db.connect(conninfo, autocommit=True) as conn:
        schemas = store.exposed_schemas(conn)
    return None if schemas is None else API_SCHEMA in schemas


def pending_migrations(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations of ``directory`` the database has not applied, oldest first: all of
    them on a database without Taskman, none when Taskman's schema is there but the record
    holds none of its versions (installed under versions of its own: this cannot tell).
    Raises psycopg.Error when it cannot look."""
    with db.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        try:
            applied = store.applied_migrations(conn)
        except psycopg.errors.UndefinedTable:  # no migration was ever recorded here
            applied = set()
        shipped = list_migrations(directory)
        if not applied & {m.version for m in shipped} and store.api_schema_exists(conn):
            return []
    return [m for m in shipped if m.version not in applied]


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Bring the database up to date and return the migrations applied now.

    On a database that is not Supabase, ``sql/supabase_compat.sql`` runs first.
    Each migration runs in its own transaction together with its bookkeeping
    row, so a failing one leaves nothing half-applied. Every transaction first
    takes a transaction-scoped advisory lock and reads what is applied under it:
    concurrent callers wait for each other, each migration applies once, in order,
    and nothing needs a session, so this works through a transaction pooler too.
    """
    applied_now = []
    with db.connect(conninfo, autocommit=True) as conn:
        supabase = store.is_supabase(conn)
        with conn.transaction():
            store.lock_migrations(conn)
            if not supabase:
                conn.execute(COMPAT_SQL.read_text(encoding="utf-8"))
            store.create_migrations_table(conn)
        for migration in list_migrations(directory):
            with conn.transaction():
                store.lock_migrations(conn)
                if migration.version in store.applied_migrations(conn):
                    continue
                script = migration.path.read_text(encoding="utf-8")
                conn.execute(script)
                store.record_migration(conn, migration.version, migration.name, script)
            applied_now.append(migration)
    return applied_now
