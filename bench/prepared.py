"""What prepared statements are worth: the worker's statements with and without them.

Behind a transaction pooler the worker and the edge prepare nothing (psycopg's
``prepare_threshold=None``); on a direct connection or a session pooler they keep
psycopg's default (a statement is prepared from its fifth use). Measured in one run:

- the no-news poll cycle: the database side of polling tasks whose remote says "still
  running", i.e. ``claim_due_tasks`` then ``record_poll_results`` with nothing changed,
  on one connection, for a batch of 1 and of 100 tasks (median per cycle);
- the drain: a worker process completing tasks that are done on their first poll
  (tasks per second from the commit that creates them to the last completed).

Each on a direct connection with and without prepared statements, and through PgBouncer
(standing in for Supabase's poolers) where it is installed.

    python -m bench.prepared [--cycles 400] [--tasks 10000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import psycopg

from bench.cluster import fill_tasks, migrated_databases, queries, wait_for_completion
from bench.instant_remote import instant_remote
from bench.worker_bench import worker_process
from worker import store
from worker.devtools.pgbouncer import PgBouncer, find_pgbouncer
from worker.domain import PollOutcome

WORKER_ID = "bench-prepared"
ROUNDS = 4  # cycles alternate between the connections in rounds, so drift hits all alike


@dataclass
class _Connection:
    name: str
    url: str
    prepared: bool
    cycle_ms: dict[int, list[float]] = field(default_factory=dict)


async def _cycles(conn: psycopg.AsyncConnection, batch: int, cycles: int) -> list[float]:
    """Milliseconds per no-news cycle: claim `batch` due tasks, record "still running"."""
    timings = []
    for _ in range(cycles):
        started = time.perf_counter()
        claimed = await store.claim_due_tasks(conn, WORKER_ID, batch, 60)
        outcomes: list[PollOutcome] = [
            {"task_id": str(t.task_id), "worker_id": WORKER_ID, "ok": True,
             "delay_seconds": 0.0, "http_status": 200, "latency_ms": 1.0} for t in claimed]
        await store.record_poll_results(conn, outcomes)
        timings.append((time.perf_counter() - started) * 1000)
        assert len(claimed) == batch, "the tasks should be due again at once"
    return timings


async def _measure_cycles(connections: list[_Connection], batch: int, cycles: int) -> None:
    opened = [await psycopg.AsyncConnection.connect(
        c.url, autocommit=True, prepare_threshold=5 if c.prepared else None)
        for c in connections]
    try:
        for conn in opened:
            await _cycles(conn, batch, 10)  # warm up: prepared from the fifth use
        for _ in range(ROUNDS):
            for c, conn in zip(connections, opened, strict=True):
                c.cycle_ms.setdefault(batch, []).extend(
                    await _cycles(conn, batch, cycles // ROUNDS))
    finally:
        for conn in opened:
            await conn.close()


def _drain(database_url: str, direct_url: str, base_url: str, count: int, concurrency: int,
           **env: str) -> float:
    """Tasks per second for a worker draining `count` due tasks (done on first poll)."""
    env = {"TASKMAN_CONCURRENCY": str(concurrency),
           "TASKMAN_PER_HOST_CONCURRENCY": str(concurrency), **env}
    q = queries()
    with worker_process(database_url, listening_on=direct_url, **env), \
            psycopg.connect(direct_url, autocommit=True) as conn:
        conn.execute(q["delete_tasks"])
        conn.execute(q["create_due_tasks"], {"base_url": base_url, "count": count})
        started = time.perf_counter()
        wait_for_completion(conn, count)
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=400, help="no-news cycles per figure")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per drain")
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()

    with migrated_databases("bench_cycle_1", "bench_cycle_100", "bench_drain") as urls, \
            ExitStack() as stack, instant_remote() as base_url:
        have_pgbouncer = find_pgbouncer() is not None
        poolers = {mode: stack.enter_context(PgBouncer(urls["bench_drain"], mode))
                   for mode in (("session", "transaction") if have_pgbouncer else ())}

        cycle_rows: dict[int, list[_Connection]] = {}
        for batch in (1, 100):
            url = urls[f"bench_cycle_{batch}"]
            fill_tasks(url, due=batch)
            connections = [_Connection("direct, prepared", url, True),
                           _Connection("direct, unprepared", url, False)]
            if poolers:
                connections += [
                    _Connection("session pooler, prepared", poolers["session"].through(url),
                                True),
                    _Connection("transaction pooler, unprepared",
                                poolers["transaction"].through(url), False)]
            asyncio.run(_measure_cycles(connections, batch, args.cycles))
            cycle_rows[batch] = connections

        direct = urls["bench_drain"]
        unprepared = {"TASKMAN_DATABASE_POOL_MODE": "transaction",
                      "TASKMAN_LISTEN_DATABASE_URL": direct}
        drains = [("direct, prepared (session mode)", direct, {}),
                  ("direct, unprepared (transaction mode)", direct, unprepared)]
        if poolers:
            drains.append(("transaction pooler + listen URL, unprepared",
                           poolers["transaction"].through(direct), unprepared))
        drain_rates = []
        for label, url, env in drains:
            drain_rates.append(
                (label, _drain(url, direct, base_url, args.tasks, args.concurrency, **env)))

    print(f"no-news poll cycle (claim_due_tasks + record_poll_results, nothing changed), "
          f"median of {args.cycles} per figure")
    print(f"  {'':<33} {'batch 1':>10} {'batch 100':>11}")
    for i, c in enumerate(cycle_rows[1]):
        figures = [statistics.median(cycle_rows[b][i].cycle_ms[b]) for b in (1, 100)]
        print(f"  {c.name + ':':<33} {figures[0]:7.2f} ms {figures[1]:8.2f} ms")
    print(f"drain: {args.tasks:,} tasks done on first poll, concurrency {args.concurrency}")
    for label, rate in drain_rates:
        print(f"  {label + ':':<45} {rate:7.0f} tasks/s")
    if not poolers:
        print("  (pgbouncer is not installed: the pooler rows were not measured)")


if __name__ == "__main__":
    main()
