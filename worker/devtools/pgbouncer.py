"""A throwaway PgBouncer in front of a PostgreSQL server, for tests and benchmarks.

It stands in for Supabase's shared pooler (Supavisor): ``pool_mode="transaction"`` is
its port 6543 (no session state, no LISTEN, no named prepared statements survive a
transaction), ``pool_mode="session"`` its port 5432. Every user in ``users`` logs in
without a password (``auth_type = trust``), as on the test cluster behind it.

The binary is ``TASKMAN_PGBOUNCER`` if set, else ``pgbouncer`` on ``PATH`` or in
``/usr/sbin`` (Debian's ``pgbouncer`` package).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from worker.devtools.pgcluster import free_port, unprivileged_user

PoolMode = Literal["session", "transaction"]
SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


def find_pgbouncer() -> Path | None:
    """The PgBouncer binary to run, or None when none is installed (or
    ``TASKMAN_PGBOUNCER`` names no executable)."""
    configured = os.environ.get("TASKMAN_PGBOUNCER")
    if configured:
        return Path(configured) if os.access(configured, os.X_OK) else None
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path=os.pathsep.join(SEARCH_PATH))
    return Path(found) if found else None


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """A PgBouncer on 127.0.0.1 pooling connections to the server of ``server_url``.

    Any database name a client asks for is passed through to that server. ``kill()``
    and ``start()`` again simulate a pooler crash and restart on the same port.
    """

    def __init__(
        self,
        server_url: str,
        pool_mode: PoolMode,
        *,
        users: Sequence[str] = ("postgres", "authenticator"),
        pool_size: int = 20,
        port: int | None = None,
        binary: Path | None = None,
    ) -> None:
        if pool_mode not in ("session", "transaction"):
            raise ValueError(f"pool_mode must be session or transaction, not {pool_mode!r}")
        self.binary = binary or find_pgbouncer()
        if self.binary is None:
            raise FileNotFoundError(
                "pgbouncer is not installed (Debian: apt-get install pgbouncer), or "
                "TASKMAN_PGBOUNCER does not name it")
        server = conninfo_to_dict(server_url)
        self.pool_mode = pool_mode
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"taskman-pgbouncer-{pool_mode}-"))
        self.user = unprivileged_user()  # PgBouncer refuses to run as root
        self.process: subprocess.Popen[bytes] | None = None
        # A password in the server URL is the one PgBouncer logs in with, for its user.
        passwords = {str(server.get("user", "postgres")): str(server.get("password", ""))}
        (self.root / "userlist.txt").write_text("".join(
            f"{_quote(user)} {_quote(passwords.get(user, ''))}\n" for user in users))
        (self.root / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server.get("host", "127.0.0.1")} port={server.get("port", 5432)}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root / "userlist.txt"}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 1000
; Log in to the server again at once after it (or this pooler) restarted.
server_login_retry = 1
logfile = {self.root / "pgbouncer.log"}
log_connections = 0
log_disconnections = 0
""")

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        """A URL to ``database`` on the server, through this pooler."""
        return make_conninfo(f"postgresql://{user}@127.0.0.1:{self.port}/{database}")

    def through(self, url: str) -> str:
        """``url`` (a database on the server behind) reached through this pooler instead."""
        return make_conninfo(url, host="127.0.0.1", port=str(self.port))

    def start(self) -> PgBouncer:
        """Start (or start again, on the same port) and wait until it serves connections."""
        if self.process and self.process.poll() is None:
            return self
        if self.user:
            self.root.chmod(0o755)
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, self.user)
        log = (self.root / "output.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.binary), str(self.root / "pgbouncer.ini")],
            stdout=log, stderr=log, user=self.user)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=1, prepare_threshold=None).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start in {timeout}s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: every client and server connection drops at once, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def log_tail(self) -> str:
        text = ""
        for name in ("output.log", "pgbouncer.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
