"""Worker throughput: tasks completing on their first poll, against plain HTTP GETs.

One worker process polls an instant local status API; the figure is tasks per second
from the commit that creates them to the last one completed. Beside it, the baseline:
the same number of plain httpx GETs at the same concurrency, no database. Their ratio
is the share of raw HTTP throughput the worker keeps (target >= 60%).

    python -m bench.worker_throughput [--tasks 20000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import httpx
import psycopg

from bench.cluster import migrated_databases, queries
from bench.instant_remote import instant_remote
from bench.worker_bench import worker_process
from worker.polling.poller import client_count


async def _plain_gets(base_url: str, count: int, concurrency: int, clients: int) -> float:
    """Seconds for `count` GETs, `concurrency` at a time, spread over `clients` keep-alive
    clients (round-robin, as the worker spreads its polls)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    pool = [httpx.AsyncClient(limits=limits, trust_env=False) for _ in range(clients)]
    urls = iter(f"{base_url}/status/{i}" for i in range(count))
    next_client = itertools.cycle(pool)

    async def fetch_all() -> None:
        for url in urls:
            (await next(next_client).get(url)).raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(fetch_all() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    for client in pool:
        await client.aclose()
    return elapsed


def _worker_seconds(database_url: str, base_url: str, count: int, concurrency: int) -> float:
    """Seconds from creating `count` due tasks (one commit) to all of them completed."""
    env = {"TASKMAN_CONCURRENCY": str(concurrency),
           # One remote host here: let it have all the slots, as the baseline does.
           "TASKMAN_PER_HOST_CONCURRENCY": str(concurrency)}
    q = queries()
    with worker_process(database_url, **env), \
            psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(q["create_due_tasks"], {"base_url": base_url, "count": count})
        started = time.perf_counter()
        while conn.execute(q["count_completed"]).fetchone()[0] < count:
            time.sleep(0.02)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()

    with migrated_databases("bench_worker") as urls, instant_remote() as base_url:
        one_client = asyncio.run(_plain_gets(base_url, args.tasks, args.concurrency, 1))
        clients = client_count(args.concurrency)
        spread = asyncio.run(_plain_gets(base_url, args.tasks, args.concurrency, clients))
        worker = _worker_seconds(urls["bench_worker"], base_url, args.tasks, args.concurrency)

    rate = {name: args.tasks / seconds for name, seconds in
            (("one", one_client), ("spread", spread), ("worker", worker))}
    rows = [("plain httpx GETs, one client", rate["one"]),
            (f"plain httpx GETs, {clients} clients (as the worker)", rate["spread"]),
            ("worker, create -> all completed", rate["worker"])]
    print(f"{args.tasks:,} tasks done on first poll, concurrency {args.concurrency}")
    for label, value in rows:
        print(f"  {label + ':':<45} {value:7.0f} /s")
    print(f"  ratio to one client: {rate['worker'] / rate['one']:.0%}; to the same clients: "
          f"{rate['worker'] / rate['spread']:.0%} (target >= 60%)")

if __name__ == "__main__":
    main()
