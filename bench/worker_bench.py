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
def worker_process(database_url: str, *, listening_on: str | None = "",
                   **env: str) -> Iterator[subprocess.Popen]:
    """A ``taskman worker`` with production defaults (private networks allowed: the remote
    is local), once it listens for task changes; SIGTERMed afterwards.

    ``listening_on`` is a direct URL to the database where its listener shows (default:
    ``database_url``); None when it does not listen (it polls): then it is yielded at once.
    """
    environ = {**os.environ, "DATABASE_URL": database_url,
               "TASKMAN_ALLOW_PRIVATE_NETWORKS": "true", **env}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=REPO,
                               env=environ)
    try:
        if listening_on is not None:
            with psycopg.connect(listening_on or database_url, autocommit=True,
                                 prepare_threshold=None) as conn:
                while not conn.execute(queries()["workers_listening"]).fetchone()[0]:
                    if process.poll() is not None:
                        raise RuntimeError(f"the worker exited with {process.returncode}")
                    time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
