"""Latency from creating a task to its first poll, with an idle worker, for each way the
worker can reach the database (target median < 50 ms where it can LISTEN).

Tasks are created one at a time, each once the previous one was polled (after a random
pause where the worker polls), by a plain INSERT as any client would; the remote notes
when each poll arrives. Arrangements: a direct
connection; a session pooler; a transaction pooler with a separate listen URL (direct);
a transaction pooler alone, where the worker checks the due index every
TASKMAN_CHANGE_CHECK_INTERVAL (0.5 s) instead. PgBouncer stands in for Supabase's poolers;
without it, only the direct connection is measured.

    python -m bench.worker_latency [--tasks 200] [--polled-tasks 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

from bench.cluster import migrated_databases, queries
from bench.worker_bench import worker_process
from worker.devtools.pgbouncer import PgBouncer, find_pgbouncer

BODY = b'{"status": "done"}'


class _Arrivals:
    """When each path was first requested (time.perf_counter)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.arrived = threading.Condition()

    def note(self, path: str) -> None:
        with self.arrived:
            self.times.setdefault(path, time.perf_counter())
            self.arrived.notify_all()

    def wait_for(self, path: str, timeout: float = 10.0) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: path in self.times, timeout):
                raise TimeoutError(f"{path} was not polled within {timeout}s")
            return self.times[path]


@contextmanager
def _timing_remote() -> Iterator[tuple[str, _Arrivals]]:
    arrivals = _Arrivals()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            arrivals.note(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", arrivals
    finally:
        server.shutdown()
        server.server_close()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass(frozen=True)
class _Arrangement:
    name: str
    database_url: str  # the worker's DATABASE_URL
    env: dict[str, str]
    listening_on: str | None  # where the worker's listener shows; None: it polls


def _arrangements(direct: str, poolers: dict[str, PgBouncer]) -> list[_Arrangement]:
    found = [_Arrangement("direct connection", direct, {}, "")]
    if poolers:
        transaction = poolers["transaction"].through(direct)
        found += [
            _Arrangement("session pooler", poolers["session"].through(direct), {}, direct),
            _Arrangement("transaction pooler + listen URL", transaction,
                         {"TASKMAN_DATABASE_POOL_MODE": "transaction",
                          "TASKMAN_LISTEN_DATABASE_URL": direct}, direct),
            _Arrangement("transaction pooler, polling", transaction,
                         {"TASKMAN_DATABASE_POOL_MODE": "transaction"}, None),
        ]
    return found


def _measure(arrangement: _Arrangement, direct: str, tasks: int, base: str,
             arrivals: _Arrivals) -> tuple[list[float], list[float]]:
    """Create-to-first-poll latencies (ms), and the create-to-recorded median and p99."""
    q = queries()
    latencies = []
    with worker_process(arrangement.database_url, listening_on=arrangement.listening_on,
                        **arrangement.env), psycopg.connect(direct, autocommit=True) as conn:
        conn.execute(q["create_task"], {"poll_url": f"{base}/warmup"})
        arrivals.wait_for("/warmup", timeout=60)  # the worker is up
        time.sleep(1)  # let the worker settle into idle
        conn.execute(q["delete_tasks"])  # the warm-up task is not measured
        for i in range(tasks):
            path = f"/status/{i}"
            created = time.perf_counter()
            conn.execute(q["create_task"], {"poll_url": base + path})
            latencies.append((arrivals.wait_for(path) - created) * 1000)
            # A polling worker checks on a fixed beat: tasks arriving at random times
            # wait half a beat on average (arriving right after a poll, a whole one).
            time.sleep(0.02 if arrangement.listening_on is not None
                       else random.uniform(0.02, 0.52))
        time.sleep(0.5)  # the last poll's record
        recorded = conn.execute(q["first_poll_recorded_ms"]).fetchone()[0]
    return latencies, recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--polled-tasks", type=int, default=50,
                        help="tasks for the arrangement that polls (each waits ~0.25 s)")
    args = parser.parse_args()

    rows = []
    with migrated_databases("bench_latency") as urls, ExitStack() as stack:
        direct = urls["bench_latency"]
        poolers = {}
        if find_pgbouncer():
            poolers = {mode: stack.enter_context(PgBouncer(direct, mode))
                       for mode in ("session", "transaction")}
        for arrangement in _arrangements(direct, poolers):
            count = args.tasks if arrangement.listening_on is not None else args.polled_tasks
            with _timing_remote() as (base, arrivals):
                latencies, recorded = _measure(arrangement, direct, count, base, arrivals)
            rows.append((arrangement.name, count, latencies, recorded))

    print("create -> first poll, tasks one at a time, idle worker")
    for name, count, latencies, recorded in rows:
        print(f"  {name + ':':<33} median {statistics.median(latencies):6.1f} ms   "
              f"p99 {_percentile(latencies, 0.99):6.1f} ms   ({count} tasks; recorded: "
              f"median {recorded[0]:6.1f} ms, p99 {recorded[1]:6.1f} ms)")
    print("  target: median < 50 ms where the worker can LISTEN; about half the check "
          "interval (0.5 s) when it polls")
    if not find_pgbouncer():
        print("  (pgbouncer is not installed: the pooler arrangements were not measured)")


if __name__ == "__main__":
    main()
