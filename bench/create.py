"""create_task throughput from one connection, each call its own durable transaction.

Measured twice: one call at a time (a client waiting for each answer), and
pipelined (psycopg pipeline mode: the client sends without waiting, each call
still commits on its own).

    python -m bench.create [--tasks 10000]
"""

from __future__ import annotations

import argparse
import time

import psycopg
from psycopg.types.json import Jsonb

from bench.cluster import migrated_databases

STATEMENT = ("select taskman.create_task(poll_url => %s, task_type => 'report',"
             " metadata => %s, idempotency_key => %s)")


def _run(conn: psycopg.Connection, label: str, count: int) -> None:
    for i in range(count):
        conn.execute(STATEMENT, (f"https://api.example.com/{label}/{i}", Jsonb({"i": i}),
                                 f"{label}-{i}"))


def _rate(conn: psycopg.Connection, label: str, count: int, pipelined: bool) -> float:
    started = time.perf_counter()
    if pipelined:
        with conn.pipeline():
            _run(conn, label, count)
    else:
        _run(conn, label, count)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()

    with migrated_databases("bench_create") as urls, psycopg.connect(
        urls["bench_create"], autocommit=True
    ) as conn:
        _run(conn, "warmup", 300)
        sequential = _rate(conn, "sequential", args.tasks, pipelined=False)
        pipelined = _rate(conn, "pipelined", args.tasks, pipelined=True)

    print(f"create_task, one connection, {args.tasks:,} tasks, each its own durable commit")
    print(f"  one at a time: {sequential:7,.0f} tasks/s  ({1000 / sequential:.3f} ms per task)")
    print(f"  pipelined:     {pipelined:7,.0f} tasks/s  ({1000 / pipelined:.3f} ms per task)")
    print("  target: >= 2,000 tasks/s")


if __name__ == "__main__":
    main()
