"""Running the worker in tests: in-process in a thread, or as a ``taskman worker`` process."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
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
        if thread.is_alive():
            raise AssertionError(f"the worker did not stop:\n{_stacks(thread, control['loop'])}")


def _stacks(thread: threading.Thread, loop: asyncio.AbstractEventLoop) -> str:
    """Where a worker that does not stop is: its thread's stack, and each of its asyncio
    tasks' stack (when its loop still runs callbacks)."""
    frame = sys._current_frames().get(thread.ident or 0)
    parts = ["thread:\n" + "".join(traceback.format_stack(frame))] if frame else []
    collected = threading.Event()
    found: list[str] = []

    def collect() -> None:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            print(repr(task), file=out)
            task.print_stack(limit=8, file=out)
        found.append(out.getvalue())
        collected.set()

    try:
        loop.call_soon_threadsafe(collect)
    except RuntimeError as exc:  # the loop is closed
        return "\n".join([*parts, f"tasks: {exc}"])
    parts.append(found[0] if collected.wait(2) else "tasks: the loop runs no callbacks")
    return "\n".join(parts)


def start_worker_process(database_url: str, *args: str, **env: str) -> subprocess.Popen:
    """``python -m worker.cli worker`` with the test environment; stderr is captured (with
    faulthandler on, so that ``exit_code`` can have it print where a stuck worker is)."""
    environ = {**os.environ, **TEST_ENV, "DATABASE_URL": database_url,
               "PYTHONFAULTHANDLER": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", *args],
        cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def exit_code(process: subprocess.Popen, timeout: float) -> int:
    """The exit code of a worker process. One still running after `timeout` is aborted
    (faulthandler prints each thread's stack) and the test fails with its stderr."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"the worker did not exit within {timeout}s; its stderr ends:\n"
                             f"{stderr[-20_000:]}") from None


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
