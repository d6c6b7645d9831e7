"""Callbacks as fast as completions: the outbox against plain aiohttp POSTs, in one run.

One worker process (production defaults, a callback secret, concurrency 100 and one
receiver host allowed all of it, as the baseline) delivers completion callbacks to
bench.callback_receiver (its own process, answers 200 at once, notes each arrival).
In the same run, against the same receiver:

- the bare client: the same number of POSTs of a task-sized JSON body with aiohttp at
  concurrency 100, one keep-alive session, no database;
- a backlog: that many tasks with a ``callback_url`` completed in one transaction;
  callbacks per second from its commit (when the rows exist) to the last arrival,
  and its ratio to the bare client (target >= 50%);
- a burst: as many completed in 20 transactions within about 0.5 s (so at most about
  4,000 a second: the rate shows whether delivery keeps pace); latency from each
  task's end (taken just before its completing statement, so a little pessimistic)
  to its callback's arrival, p50 and p99 (target p99 < 2 s);
- meanwhile, polls of running tasks (``--running`` of them, polled every second) go on:
  their rate during the burst against the same worker's rate just before
  (target >= 80%), and during the backlog's drain;
- single completions into an idle outbox, one at a time: latency p50 and p99
  (target p50 < 50 ms).

    python -m bench.outbox_throughput [--callbacks 2000] [--running 200] [--singles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import psycopg

from bench.callback_receiver import arrivals, callback_receiver
from bench.cluster import migrated_databases
from bench.worker_bench import worker_process

CONCURRENCY = 100
BATCHES = 20
BURST_SECONDS = 0.5
QUIET_SECONDS = 3.0


def _body(i: int) -> bytes:
    """About what a task's public JSON weighs."""
    return (b'{"task_id":"00000000-0000-4000-8000-%012d","status":"completed",'
            b'"task_type":"generic","progress":100,"result":{"ok":true},"metadata":{},'
            b'"created_at":"2026-12-01T00:00:00+00:00","completed_at":'
            b'"2026-12-01T00:00:01+00:00","callback_url":"http://127.0.0.1/hook"}' % i)


async def _bare_posts(base_url: str, count: int) -> float:
    """POSTs per second: `count` POSTs, CONCURRENCY at a time, one keep-alive session."""
    bodies = iter([_body(i) for i in range(count)])
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def post_all() -> None:
            for body in bodies:
                async with session.post(f"{base_url}/hook", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    r.raise_for_status()
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(post_all() for _ in range(CONCURRENCY)))
        return count / (time.perf_counter() - started)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _callback_tasks(conn: psycopg.Connection, url: str, count: int) -> list[str]:
    rows = conn.execute("insert into taskman.tasks (callback_url)"
                        " select %s from generate_series(1, %s) returning task_id",
                        (url, count)).fetchall()
    return [str(r[0]) for r in rows]


def _complete(conn: psycopg.Connection, task_ids: list[str]) -> float:
    """Complete `task_ids` in one transaction; returns when it started (wall clock)."""
    started = time.time()
    conn.execute("select taskman.update_task(t, 'completed') from unnest(%s::uuid[]) t",
                 (task_ids,))
    return started


def _wait_for(base_url: str, task_ids: set[str], timeout: float = 120) -> dict[str, Any]:
    """Arrivals until every task of `task_ids` has one; the first of each, and the GETs."""
    first: dict[str, float] = {}
    gets: list[float] = []
    deadline = time.monotonic() + timeout
    while not task_ids <= first.keys():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(task_ids - first.keys())} callbacks never arrived")
        time.sleep(0.05)
        noted = asyncio.run(arrivals(base_url))
        for task_id, at in noted["posts"]:
            first.setdefault(task_id, at)
        gets += noted["gets"]
    return {"first": first, "gets": gets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=2_000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--singles", type=int, default=30)
    args = parser.parse_args()

    env = {"TASKMAN_CONCURRENCY": str(CONCURRENCY),
           # One receiver host here: let it have all the slots, as the baseline does.
           "TASKMAN_PER_HOST_CONCURRENCY": str(CONCURRENCY),
           "TASKMAN_CALLBACK_SECRET": "bench-secret",
           # Running tasks are polled every second, without adaptive back-off.
           "TASKMAN_MAX_POLL_INTERVAL": "1"}
    with migrated_databases("bench_outbox") as urls, callback_receiver() as receiver, \
            callback_receiver() as remote:
        url = urls["bench_outbox"]
        asyncio.run(_bare_posts(receiver, 500))  # warm up
        bare = asyncio.run(_bare_posts(receiver, args.callbacks))
        asyncio.run(arrivals(receiver))  # forget the bare client's
        with psycopg.connect(url, autocommit=True) as conn:
            singles = _callback_tasks(conn, f"{receiver}/single", args.singles)
            burst = _callback_tasks(conn, f"{receiver}/burst", args.callbacks)
            backlog = _callback_tasks(conn, f"{receiver}/backlog", args.callbacks)
            with worker_process(url, **env):
                # Single completions into an idle outbox.
                single_latency = []
                for task_id in singles:
                    time.sleep(0.1)
                    ended = _complete(conn, [task_id])
                    noted = _wait_for(receiver, {task_id})
                    single_latency.append(noted["first"][task_id] - ended)

                # Running tasks, polled every second, then the burst beside them.
                conn.execute("insert into taskman.tasks (poll_url, poll_interval_seconds)"
                             " select %s || '/status/' || i, 1 from generate_series(1, %s) i",
                             (remote, args.running))
                time.sleep(QUIET_SECONDS)
                asyncio.run(arrivals(remote))
                time.sleep(QUIET_SECONDS)
                quiet_polls = len(asyncio.run(arrivals(remote))["gets"]) / QUIET_SECONDS

                ended: dict[str, float] = {}
                size = -(-len(burst) // BATCHES)
                for b in range(BATCHES):
                    batch = burst[b * size:(b + 1) * size]
                    at = _complete(conn, batch)
                    ended.update(dict.fromkeys(batch, at))
                    time.sleep(BURST_SECONDS / BATCHES)
                noted = _wait_for(receiver, set(burst))
                polls_during = asyncio.run(arrivals(remote))["gets"]

                # A backlog: as many completed in one transaction, drained at full speed.
                time.sleep(1)
                asyncio.run(arrivals(remote))
                backlog_end = _complete(conn, backlog)
                committed = time.time() - backlog_end
                drained = _wait_for(receiver, set(backlog))
                backlog_last = max(drained["first"].values())
                backlog_rate = len(backlog) / (backlog_last - backlog_end - committed)
                polls_backlog = asyncio.run(arrivals(remote))["gets"]

    first_end = min(ended.values())
    last_arrival = max(noted["first"].values())
    rate = len(burst) / (last_arrival - first_end)
    latency = [noted["first"][t] - ended[t] for t in burst]
    window = max(1.0, last_arrival - first_end)
    burst_polls = sum(first_end <= t <= first_end + window for t in polls_during) / window
    backlog_window = max(1.0, backlog_last - backlog_end)
    backlog_polls = sum(backlog_end <= t <= backlog_end + backlog_window
                        for t in polls_backlog) / backlog_window

    print(f"Callbacks: one worker, concurrency {CONCURRENCY}, a local receiver answering 200"
          " at once")
    print(f"  bare aiohttp POSTs/s to the same receiver        {bare:>8.0f}")
    print(f"  backlog of {len(backlog):,} completed at once: callbacks/s      "
          f"{backlog_rate:>8.0f}   ratio {backlog_rate / bare:.0%}  (target >= 50%;"
          f" its transaction took {committed:.2f} s)")
    print(f"  burst of {len(burst):,} completions over ~{BURST_SECONDS} s: callbacks/s"
          f" {rate:>8.0f}   (as fast as they complete)")
    print(f"  burst latency, end to arrival: p50 {statistics.median(latency) * 1000:.0f} ms,"
          f" p99 {_percentile(latency, 99) * 1000:.0f} ms  (target p99 < 2000 ms)")
    print(f"  polls/s of {args.running} running tasks: {quiet_polls:.0f} before,"
          f" {burst_polls:.0f} during the burst ({window:.1f} s), ratio"
          f" {burst_polls / quiet_polls:.0%}  (target >= 80%)")
    print(f"  polls/s during the backlog ({backlog_window:.1f} s): {backlog_polls:.0f}, ratio"
          f" {backlog_polls / quiet_polls:.0%}")
    print(f"  single completions into an idle outbox ({len(singles)}): p50"
          f" {statistics.median(single_latency) * 1000:.1f} ms,"
          f" p99 {_percentile(single_latency, 99) * 1000:.1f} ms  (target p50 < 50 ms)")


if __name__ == "__main__":
    main()
