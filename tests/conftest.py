"""Test harness: one PostgreSQL for the session, a migrated template cloned per test."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.missing_tools import missing
from tests.poolers import ARRANGEMENTS, Arrangement, arrangement
from tests.remote_api import RemoteAPI, remote_api
from worker import db
from worker.devtools.pgbouncer import PgBouncer, find_pgbouncer
from worker.devtools.pgcluster import Cluster, default_bin_dir
from worker.migrate import MIGRATIONS_DIR, migrate

TEMPLATE = "taskman_template"
_counter = itertools.count()


def _with_database(url: str, database: str, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(path=f"/{database}", netloc=netloc))


@contextmanager
def database_before(server_url: str, version: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a new database with the migrations older than `version` applied (as a
    deployed database would have them), dropped afterwards; ``migrate(url)`` upgrades it."""
    previous = tmp_path / f"migrations_before_{version}"
    previous.mkdir()
    for migration in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if migration.name < version:
            (previous / migration.name).symlink_to(migration)
    name = f"taskman_before_{version}_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")
        admin.execute(f"create database {name}")
    url = _with_database(server_url, name)
    try:
        migrate(url, previous)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A superuser URL to a server with a migrated template database."""
    external = os.environ.get("TASKMAN_TEST_DATABASE_URL")
    cluster = None
    if external:
        url = external
    else:
        # Logical decoding lets tests count what reaches Realtime (tests/test_quiet_polls.py).
        cluster = Cluster(default_bin_dir(), {"wal_level": "logical"}).start()
        url = cluster.url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {TEMPLATE} with (force)")
        conn.execute(f"create database {TEMPLATE}")
    migrate(_with_database(url, TEMPLATE))
    try:
        yield url
    finally:
        if cluster:
            cluster.stop()


@contextmanager
def cloned_database(server_url: str, kind: str, template: str = TEMPLATE) -> Iterator[str]:
    """A fresh, migrated database (a clone of `template`) until the block ends."""
    name = f"taskman_{kind}_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"create database {name} template {template}")
    try:
        yield _with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with cloned_database(server_url, "test") as url:
        yield url


@pytest.fixture(scope="module")
def module_database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database shared by one module's tests (for hypothesis suites)."""
    with cloned_database(server_url, "module") as url:
        yield url


@pytest.fixture
def remote() -> Iterator[RemoteAPI]:
    """The fake remote status API for one test."""
    with remote_api() as api:
        yield api


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen]]:
    """Worker processes started by a test; killed at its end if still running."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


@pytest.fixture(scope="module")
def module_conn(module_database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection to module_database_url."""
    with psycopg.connect(module_database_url, autocommit=True, row_factory=dict_row) as c:
        yield c


def require_pgbouncer() -> None:
    """Skip without PgBouncer, except in CI (CI set, as .ci/run sets it), where every test
    must run."""
    if find_pgbouncer() is None:
        missing("pgbouncer is not installed (Debian: apt-get install pgbouncer)")


@pytest.fixture(scope="session")
def poolers(server_url: str) -> Iterator[dict[str, PgBouncer]]:
    """PgBouncer in front of the test server in transaction and in session mode: the
    stand-ins for Supabase's transaction pooler (port 6543) and session pooler."""
    require_pgbouncer()
    started: list[PgBouncer] = []
    try:
        for mode in ("transaction", "session"):
            started.append(PgBouncer(server_url, mode).start())
        yield {pooler.pool_mode: pooler for pooler in started}
    finally:
        for pooler in started:
            pooler.stop()


@pytest.fixture(params=ARRANGEMENTS)
def pooled(request: pytest.FixtureRequest, poolers: dict[str, PgBouncer],
           database_url: str) -> Arrangement:
    """A fresh test database as reached through each pooler arrangement in turn."""
    return arrangement(request.param, poolers, database_url)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection (the worker's view) to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as c:
        yield c


class PostgREST:
    """Runs SQL exactly as PostgREST does: logged in as ``authenticator``, one
    transaction per request with ``SET LOCAL ROLE`` and ``request.jwt.claims``."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)

    @contextmanager
    def request(self, role: str, sub: str | None = None) -> Iterator[psycopg.Cursor]:
        claims: dict[str, Any] = {"sub": sub} if sub else {}
        with db.api_session(self.conn, role, claims) as cur:
            yield cur

    def rpc(self, role: str, function: str, sub: str | None = None, **args: Any) -> Any:
        """Call ``function`` with named arguments, as ``POST /rest/v1/rpc/<function>``."""
        named = ", ".join(f"{k} => %({k})s" for k in args)
        with self.request(role, sub) as cur:
            cur.execute(f"select taskman.{function}({named}) as r", args)
            return cur.fetchone()["r"]

    def close(self) -> None:
        self.conn.close()


@contextmanager
def _postgrest(database_url: str) -> Iterator[PostgREST]:
    client = PostgREST(_with_database(database_url, urlsplit(database_url).path[1:],
                                      user="authenticator"))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def api(database_url: str) -> Iterator[PostgREST]:
    with _postgrest(database_url) as client:
        yield client


@pytest.fixture
def other_api(database_url: str) -> Iterator[PostgREST]:
    """A second PostgREST connection, for requests that run while one of api's is open."""
    with _postgrest(database_url) as client:
        yield client


@pytest.fixture
def decoding(conn) -> Iterator[callable]:
    """A logical decoding slot on the test database; calling it returns the changes of
    taskman.tasks since the last call (INSERT/UPDATE/DELETE lines)."""
    if conn.execute("show wal_level").fetchone()["wal_level"] != "logical":
        missing("the server does not run with wal_level=logical")  # the suite's own does
    slot = f"quiet_{conn.info.backend_pid}"
    # Decoding reads WAL up to what is flushed: commit this session's writes that far.
    conn.execute("set synchronous_commit = on")
    conn.execute("select pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))

    def changes() -> list[str]:
        # Writes by other sessions (synchronous_commit off) are flushed by this commit.
        conn.execute("select pg_logical_emit_message(true, 'taskman-test', 'flush')")
        rows = conn.execute("select data from pg_logical_slot_get_changes(%s, null, null)",
                            (slot,)).fetchall()
        return [r["data"] for r in rows if r["data"].startswith("table taskman.tasks:")]

    try:
        yield changes
    finally:
        conn.execute("select pg_drop_replication_slot(%s)", (slot,))
