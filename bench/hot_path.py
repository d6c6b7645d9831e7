"""The database cycle against its raw limit, on one durable server in one run.

Taskman's cycle is the worker's own claim and record statements, with outcomes as its
poller makes them.

(a) steady no-change polls/s: Taskman's claim + record (batches of 100, every task
    "still running", due again at once) against a bare SKIP LOCKED table doing the
    same claim-and-reschedule loop, in turns of half a second (same load for both);
(b) drain of 20k tasks completing on their first poll: Taskman, pgqueuer's no-op drain
    (its own dequeue and log_jobs statements, batches of 100), the bare loop, and the
    floor of Taskman's data model (the fewest writes a completion needs there: lease,
    public row, schedule row, one event; hand-written SQL), in turns of 10 batches;
(c) create_task one call at a time against pgqueuer's enqueue one job at a time, in
    turns of 150 calls;
(d) WAL bytes per no-change poll, Taskman and bare.

    python -m bench.hot_path [--live 2000] [--seconds 5] [--drain 20000] [--creates 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import psycopg
from psycopg.types.json import Jsonb

from bench.cluster import migrated_databases, queries
from worker.db import queries as worker_queries

BATCH = 100
_HOST = "https://api.example.com:443"
_HOST_TIMING = {"cooldown_seconds": 5.0, "max_cooldown_seconds": 300.0, "spread_seconds": 5.0}


def _wal(conn: psycopg.Connection) -> int:
    return int(conn.execute("select pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def _taskman_cycle(conn: psycopg.Connection, status: str | None) -> int:
    """One claim and one record of the worker's own statements (claim_admitted_tasks,
    record_polls), with outcomes shaped as its poller makes them (the remote's body kept
    raw, a result when the task completes) and the host's one success report."""
    q = worker_queries()
    ids = [r[0] for r in conn.execute(q["claim_admitted_tasks"], {
        "worker_id": "bench", "batch_size": BATCH, "lease_seconds": 60, **_HOST_TIMING})]
    if ids:
        seen = {"worker_id": "bench", "http_status": 200, "latency_ms": 1.0, "ok": True,
                "raw_response": json.dumps({"status": "done" if status == "completed"
                                            else "running"}),
                "status": status, "progress": None, "progress_message": None,
                **({"result": {"ok": True}} if status == "completed"
                   else {"delay_seconds": 0})}
        outcomes = [{"task_id": i, **seen} for i in ids]
        conn.execute(q["record_polls"], {
            "worker_id": "bench", "results": json.dumps(outcomes),
            "host_outcomes": Jsonb([{"task_id": outcomes[-1]["task_id"], "host": _HOST,
                                     "result": "success", "error": None,
                                     "retry_after_seconds": None}]),
            "failure_threshold": 10, **_HOST_TIMING})
    return len(ids)


def _floor_cycle(conn: psycopg.Connection) -> int:
    """One batch of the floor: the fewest writes that claim and complete tasks in
    Taskman's data model (bench/queries.sql: floor_claim, floor_finish)."""
    q = queries()
    ids = [r[0] for r in conn.execute(q["floor_claim"], {"batch": BATCH})]
    if ids:
        conn.execute(q["floor_finish"], {"ids": ids})
    return len(ids)


def _bare_cycle(conn: psycopg.Connection, finish: bool) -> int:
    q = queries()
    ids = [r[0] for r in conn.execute(q["bare_claim"], {"batch": BATCH}).fetchall()]
    if ids:
        conn.execute(q["bare_finish" if finish else "bare_reschedule"], {"ids": ids})
    return len(ids)


def _steady(conn: psycopg.Connection, cycles: dict[str, Callable[[], int]], seconds: float,
            slices: int = 10) -> dict[str, tuple[float, float]]:
    """Polls/s and WAL bytes per poll of each cycle over `seconds` each, taken in turns
    of `seconds / slices` (on a shared machine, both then see the same load)."""
    polls = dict.fromkeys(cycles, 0)
    wal = dict.fromkeys(cycles, 0)
    elapsed = dict.fromkeys(cycles, 0.0)
    for _ in range(slices):
        for name, cycle in cycles.items():
            wal_before, started = _wal(conn), time.perf_counter()
            while time.perf_counter() - started < seconds / slices:
                polls[name] += cycle()
            elapsed[name] += time.perf_counter() - started
            wal[name] += _wal(conn) - wal_before
    return {name: (polls[name] / elapsed[name], wal[name] / max(polls[name], 1))
            for name in cycles}


def _drains(cycles: dict[str, Callable[[], int]], batches: int = 10) -> dict[str, float]:
    """Tasks/s of each drain, the drains taking turns of `batches` batches until all are
    empty (on a shared machine, all then see the same load)."""
    done = dict.fromkeys(cycles, 0)
    elapsed = dict.fromkeys(cycles, 0.0)
    left = set(cycles)
    while left:
        for name in sorted(left):
            started = time.perf_counter()
            for _ in range(batches):
                if not (n := cycles[name]()):
                    left.discard(name)
                    break
                done[name] += n
            elapsed[name] += time.perf_counter() - started
    return {name: done[name] / elapsed[name] for name in cycles}


class _PgqueuerDrain:
    """pgqueuer's no-op drain on its own database (its dequeue and log_jobs statements),
    one batch a call."""

    def __init__(self, url: str, jobs: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._open(url, jobs))

    async def _open(self, url: str, jobs: int) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import EntrypointExecutionParameter, Queries

        self._conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        self._pq = Queries(PsycopgDriver(self._conn))
        for start in range(0, jobs, 1000):
            n = min(1000, jobs - start)
            await self._pq.enqueue(["noop"] * n, [None] * n, [0] * n)
        self._entrypoints = {"noop": EntrypointExecutionParameter(concurrency_limit=0)}
        self._manager = uuid.uuid4()

    async def _batch(self) -> int:
        jobs = await self._pq.dequeue(BATCH, self._entrypoints, self._manager, None,
                                      timedelta(seconds=30))
        if jobs:
            await self._pq.log_jobs([(job, "successful", None) for job in jobs])
        return len(jobs)

    def cycle(self) -> int:
        return self._loop.run_until_complete(self._batch())

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


class _PgqueuerEnqueue:
    """pgqueuer's enqueue of one job at a time, on its own database (installed here)."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._open(url))

    async def _open(self, url: str) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        self._conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        self._pq = Queries(PsycopgDriver(self._conn))
        await self._pq.install()

    async def _enqueue(self, numbers: range) -> None:
        for i in numbers:
            await self._pq.enqueue("noop", str(i).encode())

    def calls(self, numbers: range) -> None:
        self._loop.run_until_complete(self._enqueue(numbers))

    def close(self) -> None:
        self._loop.run_until_complete(self._pq.clear_queue())
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


def _taskman_creates(conn: psycopg.Connection, numbers: range) -> None:
    for i in numbers:
        conn.execute("select taskman.create_task(poll_url => %s)",
                     (f"https://api.example.com/c/{i}",))


def _creates(calls: dict[str, Callable[[range], None]], count: int,
             slices: int = 20) -> dict[str, float]:
    """Calls/s of each, one call at a time, taking turns of `count / slices` calls after
    a warm-up of 200 (on a shared machine, all then see the same load)."""
    for call in calls.values():
        call(range(-200, 0))
    elapsed = dict.fromkeys(calls, 0.0)
    step = max(1, count // slices)
    for start in range(0, count, step):
        for name, call in calls.items():
            began = time.perf_counter()
            call(range(start, min(start + step, count)))
            elapsed[name] += time.perf_counter() - began
    return {name: count / elapsed[name] for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=2_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--drain", type=int, default=20_000)
    parser.add_argument("--creates", type=int, default=3_000)
    args = parser.parse_args()
    q = queries()

    with migrated_databases("bench_taskman", "bench_pgqueuer", "bench_create",
                            "bench_floor") as urls, \
            psycopg.connect(urls["bench_taskman"], autocommit=True) as conn, \
            psycopg.connect(urls["bench_floor"], autocommit=True) as floor_conn:
        conn.execute(q["bare_create"])
        # (a), (d): live tasks that stay running.
        conn.execute(q["create_due_tasks"], {"base_url": "https://api.example.com",
                                             "count": args.live})
        conn.execute(q["bare_fill"], {"count": args.live})
        conn.execute("vacuum analyze")
        for _ in range(0, args.live, BATCH):
            _taskman_cycle(conn, "in_progress")  # first polls: pending -> in_progress
        conn.execute("update taskman_private.task_schedule set next_poll_at = now()"
                     " where next_poll_at is not null")
        conn.execute("vacuum analyze")
        steady = _steady(conn, {"taskman": lambda: _taskman_cycle(conn, "in_progress"),
                                "bare": lambda: _bare_cycle(conn, False)}, args.seconds)
        (taskman_rate, taskman_wal), (bare_rate, bare_wal) = steady["taskman"], steady["bare"]

        # (b): drain.
        conn.execute(q["delete_tasks"])
        conn.execute(q["bare_truncate"])
        conn.execute(q["create_due_tasks"], {"base_url": "https://api.example.com",
                                             "count": args.drain})
        conn.execute(q["bare_fill"], {"count": args.drain})
        conn.execute("vacuum analyze")
        floor_conn.execute(q["create_due_tasks"], {"base_url": "https://api.example.com",
                                                   "count": args.drain})
        floor_conn.execute("vacuum analyze")
        # The floor writes the public row itself, as record_poll_results does.
        floor_conn.execute("select set_config('taskman.poll_writer', 'on', false)")
        enqueue = _PgqueuerEnqueue(urls["bench_pgqueuer"])  # installs pgqueuer
        pgqueuer = _PgqueuerDrain(urls["bench_pgqueuer"], args.drain)
        try:
            drains = _drains({"taskman": lambda: _taskman_cycle(conn, "completed"),
                              "pgqueuer": pgqueuer.cycle,
                              "bare": lambda: _bare_cycle(conn, True),
                              "floor": lambda: _floor_cycle(floor_conn)})
        finally:
            pgqueuer.close()
        taskman_drain, pgq_drain, bare_drain, floor_drain = (
            drains["taskman"], drains["pgqueuer"], drains["bare"], drains["floor"])
        try:
            with psycopg.connect(urls["bench_create"], autocommit=True) as create_conn:
                creates = _creates({"taskman": lambda n: _taskman_creates(create_conn, n),
                                    "pgqueuer": enqueue.calls}, args.creates)
        finally:
            enqueue.close()
        create_rate, pgq_enqueue = creates["taskman"], creates["pgqueuer"]

    print(f"Hot path, one durable server, one connection each, batches of {BATCH}")
    print(f"(a) steady no-change polls, {args.live:,} live tasks, {args.seconds:.0f}s each:")
    print(f"    Taskman claim+record {taskman_rate:9,.0f} polls/s")
    print(f"    bare SKIP LOCKED     {bare_rate:9,.0f} polls/s")
    print(f"    ratio {taskman_rate / bare_rate:.2f} of bare   (target >= 0.40)")
    print(f"(b) drain of {args.drain:,} tasks completing on their first poll:")
    print(f"    Taskman              {taskman_drain:9,.0f} tasks/s")
    print(f"    pgqueuer no-op drain {pgq_drain:9,.0f} jobs/s")
    print(f"    bare SKIP LOCKED     {bare_drain:9,.0f} tasks/s")
    print(f"    floor of the model   {floor_drain:9,.0f} tasks/s"
          f"   ({floor_drain / pgq_drain:.2f} of pgqueuer)")
    print(f"    ratio {taskman_drain / pgq_drain:.2f} of pgqueuer (target >= 1.00), "
          f"{taskman_drain / bare_drain:.2f} of bare, "
          f"{taskman_drain / floor_drain:.2f} of the floor")
    print(f"(c) one call at a time, each its own commit, {args.creates:,} calls:")
    print(f"    Taskman create_task  {create_rate:9,.0f} tasks/s")
    print(f"    pgqueuer enqueue     {pgq_enqueue:9,.0f} jobs/s")
    print(f"    ratio {create_rate / pgq_enqueue:.2f} of pgqueuer (target >= 1.00)")
    print("(d) WAL per no-change poll:")
    print(f"    Taskman {taskman_wal:7,.0f} B   bare {bare_wal:7,.0f} B   "
          f"ratio {taskman_wal / bare_wal:.2f}x bare (target <= 2x)")


if __name__ == "__main__":
    main()
