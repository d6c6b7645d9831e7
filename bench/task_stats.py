"""task_stats against history size: the service's and one user's figures over the default
7 days, at each size of a history of finished tasks (created over 8 days by `--owners`
users, bulk-loaded, counted as the upgrade counts them), beside what reading every task
of the period (task_stats before its rollups) costs there. Also times that count (the
upgrade's: writes to tasks wait for it) and prints the rollup's rows, which level off.

    python -m bench.task_stats [--sizes 1000,100000,1000000] [--owners 50] [--live 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import psycopg

from bench.cluster import migrated_databases
from worker import db
from worker.db import parse_named_queries


@cache
def _queries() -> dict[str, str]:
    return parse_named_queries((Path(__file__).parent / "task_stats.sql").read_text("utf-8"))


def _median_ms(run: Callable[[], object], times: int) -> float:
    run()  # warm
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _as(conn: psycopg.Connection, role: str, sub: str | None, query: str) -> Callable[[], object]:
    claims = {"sub": sub} if sub else {"role": role}

    def run() -> object:
        with db.api_session(conn, role, claims) as cur:
            return cur.execute(query).fetchone()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--owners", type=int, default=50)
    parser.add_argument("--live", type=int, default=2000)
    parser.add_argument("--times", type=int, default=15)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    q = _queries()

    print(f"task_stats, default period (7 days), {args.owners} owners, {args.live:,} live"
          " tasks; medians in ms")
    print(f"{'finished':>10} {'rollup rows':>11} {'recount ms':>10} {'service':>8}"
          f" {'one user':>8} {'scan all':>9}")
    with migrated_databases("bench_task_stats") as urls, psycopg.connect(
        urls["bench_task_stats"], autocommit=True
    ) as conn:
        conn.execute("set session_replication_role = replica")
        conn.execute(q["live"], {"live": args.live, "owners": args.owners})
        user = conn.execute(q["owner"]).fetchone()[0]
        loaded = 0
        for size in sizes:
            conn.execute(q["history"], {"first": loaded + 1, "last": size,
                                        "owners": args.owners})
            loaded = size
            started = time.perf_counter()
            conn.execute(q["recount"])
            recount = (time.perf_counter() - started) * 1000
            conn.execute(q["settle"])
            rows = conn.execute(q["sizes"]).fetchone()[0]
            service = _median_ms(_as(conn, "service_role", None, q["task_stats"]), args.times)
            one = _median_ms(_as(conn, "authenticated", user, q["task_stats"]), args.times)
            scan = _median_ms(lambda: conn.execute(q["scan_every_task"]).fetchone(),
                              max(3, args.times // 5))
            print(f"{size:>10,} {rows:>11,} {recount:>10,.0f} {service:>8.1f} {one:>8.1f}"
                  f" {scan:>9.1f}", flush=True)
    print("  target: service <= 50 ms at 10M finished tasks")


if __name__ == "__main__":
    main()
