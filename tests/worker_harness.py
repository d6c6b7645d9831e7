"""Running the worker in tests: in-process in a thread, or as a ``taskman worker`` process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from worker.config import Settings
from worker.polling.loop import PeriodicJob, Worker

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent

# Tests poll their own servers on 127.0.0.1, and retry fast (with a floor to match).
TEST_ENV = {
    "TASKMAN_ALLOW_PRIVATE_NETWORKS": "true",
    "TASKMAN_RETRY_BASE": "0.05",
    "TASKMAN_MIN_POLL_INTERVAL": "0.05",
    "TASKMAN_RETRY_MAX": "0.2",
    "TASKMAN_POLL_TIMEOUT": "5",
    "TASKMAN_CONCURRENCY": "20",
}


def worker_settings(database_url: str, **env: Any) -> Settings:
    """Settings as the worker would read them from `env` (setting names as in the environment)."""
    return Settings(**{"DATABASE_URL": database_url, **TEST_ENV, **env})


@contextmanager
def running_worker(database_url: str, jobs: Sequence[PeriodicJob] = (),
                   **env: Any) -> Iterator[Worker]:
    """A worker running in a thread of this process until the block ends."""
    worker = Worker(worker_settings(database_url, **env), database_url, jobs=jobs)
    ready = threading.Event()
    control: dict[str, Any] = {}

    async def main() -> None:
        control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await worker.run(control["stop"])

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield worker
    finally:
        control["loop"].call_soon_threadsafe(control["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"


def start_worker_process(database_url: str, *args: str, **env: str) -> subprocess.Popen:
    """``python -m worker.cli worker`` with the test environment; stderr is captured."""
    environ = {**os.environ, **TEST_ENV, "DATABASE_URL": database_url, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", *args],
        cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_until(probe: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Call `probe` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        time.sleep(interval)
