"""Latency from creating a task to its first poll, with an idle worker (target median < 50 ms).

Tasks are created one at a time, each once the previous one was polled, by a plain INSERT
as any client would; the remote notes when each poll arrives.

    python -m bench.worker_latency [--tasks 200]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

from bench.cluster import migrated_databases, queries
from bench.worker_bench import worker_process

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()

    q = queries()
    latencies = []
    with migrated_databases("bench_latency") as urls, _timing_remote() as (base, arrivals):
        url = urls["bench_latency"]
        with worker_process(url), psycopg.connect(url, autocommit=True) as conn:
            time.sleep(1)  # let the worker settle into idle
            for i in range(args.tasks):
                path = f"/status/{i}"
                created = time.perf_counter()
                conn.execute(q["create_task"], {"poll_url": base + path})
                latencies.append((arrivals.wait_for(path) - created) * 1000)
                time.sleep(0.02)
            time.sleep(0.5)  # the last poll's record
            recorded = conn.execute(q["first_poll_recorded_ms"]).fetchone()[0]

    print(f"create -> first poll, {args.tasks} tasks one at a time, idle worker")
    print(f"  median {statistics.median(latencies):6.1f} ms   "
          f"p99 {_percentile(latencies, 0.99):6.1f} ms   (target median < 50 ms)")
    print(f"create -> first poll recorded: median {recorded[0]:6.1f} ms   "
          f"p99 {recorded[1]:6.1f} ms")


if __name__ == "__main__":
    main()
