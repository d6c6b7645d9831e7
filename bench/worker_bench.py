"""Shared by the worker benchmarks: a worker process to measure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench.cluster import queries

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def worker_process(database_url: str, **env: str) -> Iterator[subprocess.Popen]:
    """A ``taskman worker`` with production defaults (private networks allowed: the remote
    is local), once it listens for task changes; SIGTERMed afterwards."""
    environ = {**os.environ, "DATABASE_URL": database_url,
               "TASKMAN_ALLOW_PRIVATE_NETWORKS": "true", **env}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=REPO,
                               env=environ)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not conn.execute(queries()["workers_listening"]).fetchone()[0]:
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited with {process.returncode}")
                time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
