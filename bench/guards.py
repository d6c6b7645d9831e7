"""What the input guards cost on the hot path: before and after, in one run.

1. Reading one answer through the generic profile, as the Poller does: plain JMESPath
   (before) against the budgeted interpreter (after), for a fast poller's answer (done on
   the first poll) and a no-news answer (still pending). Microseconds per answer.
2. The worker end to end, the code of `--before` (a git revision; default: where this
   branch left main) against this tree's, on the same database server and the same instant remote:
   fast poller: tasks done on their first poll, per second, create -> all completed;
   no news: tasks answering "pending" every second, polls recorded per second.

    python -m bench.guards [--tasks 10000] [--window 8] [--before REV] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench.cluster import migrated_databases, queries, wait_for_completion
from bench.worker_bench import REPO
from worker.remote import profiles
from worker.remote.profiles import ResponseProfile, read_response

GENERIC = {"name": "generic", "status_source": "body", "status_path": "status || state",
           "completed_values": ["done"], "failed_values": ["failed"],
           "running_values": ["running"], "pending_values": ["pending"],
           "result_path": "result || data || output", "progress_path": "progress",
           "progress_message_path": "progress_message || message",
           "error_path": "error.message || error || error_message"}
ANSWERS = {"fast poller (done)": b'{"status": "done", "result": {"ok": true}}',
           "no news (pending)": b'{"status": "pending", "progress": 40}'}


class _PlainInterpreter:
    """What reading did before the budget: jmespath's own search."""

    def __init__(self, budget: int = 0) -> None:
        pass

    def search(self, expression: Any, data: Any) -> Any:
        return expression.search(data)


def _reading_us(body: bytes, plain: bool, repeats: int = 20_000) -> float:
    profile = ResponseProfile.from_dict(GENERIC)
    headers = {"content-type": "application/json"}
    budgeted = profiles.BudgetedInterpreter
    profiles.BudgetedInterpreter = _PlainInterpreter if plain else budgeted
    try:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                read_response(profile, 200, headers, body)
            runs.append((time.perf_counter() - started) / repeats * 1e6)
        return min(runs)
    finally:
        profiles.BudgetedInterpreter = budgeted


class _Instant(asyncio.Protocol):
    """Answers every request at once with the body given on the command line."""

    response = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if count := self.buffer.count(b"\r\n\r\n"):
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(self.response * count)


async def _serve(body: bytes) -> None:
    _Instant.response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    server = await asyncio.get_running_loop().create_server(_Instant, "127.0.0.1", 0,
                                                            backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


@contextmanager
def _remote(answer: str) -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-m", "bench.guards", "--serve", answer],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        yield f"http://127.0.0.1:{process.stdout.readline().strip()}"
    finally:
        process.terminate()
        process.wait()


@contextmanager
def _checkout(revision: str) -> Iterator[Path]:
    """The worker code of `revision`, in a temporary git worktree."""
    path = Path(tempfile.mkdtemp(prefix="taskman-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), revision],
                   cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO,
                       check=True)


@contextmanager
def _worker(code: Path, database_url: str) -> Iterator[None]:
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(code),
           "TASKMAN_ALLOW_PRIVATE_NETWORKS": "true", "TASKMAN_CONCURRENCY": "100",
           "TASKMAN_PER_HOST_CONCURRENCY": "100"}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=code,
                               env=env, stderr=subprocess.DEVNULL)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not conn.execute(queries()["workers_listening"]).fetchone()[0]:
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited with {process.returncode}")
                time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _fast_poller(code: Path, url: str, base: str, count: int) -> float:
    with _worker(code, url), psycopg.connect(url, autocommit=True) as conn:
        conn.execute(queries()["create_due_tasks"], {"base_url": base, "count": count})
        started = time.perf_counter()
        wait_for_completion(conn, count)
        return count / (time.perf_counter() - started)


def _no_news(code: Path, url: str, base: str, count: int, window: float) -> float:
    with _worker(code, url), psycopg.connect(url, autocommit=True) as conn:
        conn.execute(queries()["create_due_tasks_every_second"], {"base_url": base,
                                                                  "count": count})
        time.sleep(2)  # into the steady state
        before, started = conn.execute(queries()["polls_made"]).fetchone()[0], time.perf_counter()
        time.sleep(window)
        after = conn.execute(queries()["polls_made"]).fetchone()[0]
        return (after - before) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--before", help="git revision to compare with (merge-base with main)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        body = ANSWERS["fast poller (done)" if args.serve == "done" else "no news (pending)"]
        asyncio.run(_serve(body))
        return

    before = args.before or subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True, text=True,
        check=True).stdout.strip()[:12]
    print("reading one answer through the generic profile (us, best of 5)")
    for label, body in ANSWERS.items():
        plain, budgeted = _reading_us(body, plain=True), _reading_us(body, plain=False)
        print(f"  {label + ':':<22} before {plain:6.2f}   after {budgeted:6.2f}   "
              f"({budgeted - plain:+.2f} us)")

    names = [f"bench_guards_{i}" for i in range(4 * args.rounds)]
    figures: dict[tuple[str, str], list[float]] = {}
    with _checkout(before) as before_code, migrated_databases(*names) as urls, \
            _remote("done") as done, _remote("pending") as pending:
        databases = iter(urls.values())
        for _ in range(args.rounds):
            for version, code in (("before", before_code), ("after", REPO)):
                figures.setdefault(("fast", version), []).append(
                    _fast_poller(code, next(databases), done, args.tasks))
                figures.setdefault(("no news", version), []).append(
                    _no_news(code, next(databases), pending, args.tasks, args.window))
    print(f"worker end to end, {args.tasks:,} tasks, concurrency 100, best of {args.rounds}"
          f" (before = {before})")
    for scenario, unit in (("fast", "tasks/s done on first poll"),
                           ("no news", "no-news polls/s")):
        before, after = max(figures[scenario, "before"]), max(figures[scenario, "after"])
        spread = statistics.pstdev(figures[scenario, "after"]) if args.rounds > 1 else 0
        print(f"  {scenario + ':':<9} before {before:7.0f}   after {after:7.0f}   "
              f"{unit} ({after / before - 1:+.1%}; after's spread {spread:.0f})")


if __name__ == "__main__":
    main()
