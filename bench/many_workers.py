"""Many workers on one database: 1, 2 and 4 worker processes against the instant remote.

Each run creates `--tasks` tasks that complete on their first poll (one commit) and
times them until all are completed; duplicate polls (a task polled more than once,
counted from the schedule's attempt_count) must be 0.

    python -m bench.many_workers [--tasks 10000] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import psycopg

from bench.cluster import migrated_databases, queries, wait_for_completion
from bench.instant_remote import instant_remote
from bench.worker_bench import worker_process


def _run(url: str, base_url: str, workers: int, count: int) -> tuple[float, int]:
    q = queries()
    env = {"TASKMAN_CONCURRENCY": "100", "TASKMAN_PER_HOST_CONCURRENCY": "100"}
    with ExitStack() as stack, psycopg.connect(url, autocommit=True) as conn:
        for _ in range(workers):
            stack.enter_context(worker_process(url, **env))
        conn.execute(q["create_due_tasks"], {"base_url": base_url, "count": count})
        started = time.perf_counter()
        wait_for_completion(conn, count)
        elapsed = time.perf_counter() - started
        duplicates = conn.execute(q["duplicate_polls"]).fetchone()[0]
        conn.execute(q["delete_tasks"])
    return count / elapsed, duplicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    results = []
    with migrated_databases("bench_many") as urls, instant_remote() as base_url:
        for workers in args.workers:
            results.append((workers, *_run(urls["bench_many"], base_url, workers, args.tasks)))
    print(f"{args.tasks:,} tasks done on first poll, instant remote, one database")
    base = results[0][1]
    for workers, rate, duplicates in results:
        print(f"  {workers} worker process(es): {rate:7,.0f} tasks/s  ({rate / base:.2f}x of "
              f"{results[0][0]})  duplicate polls: {duplicates}  (must be 0)")


if __name__ == "__main__":
    main()
