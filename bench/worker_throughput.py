"""Worker throughput: tasks completing on their first poll, against plain HTTP GETs.

One worker process polls an instant local status API; the figure is tasks per second
from the commit that creates them to the last one completed. Beside it, in the same
run, the baseline: the same number of plain GETs at the same concurrency with the
fastest client measured (aiohttp, bench.http_clients), no database, on asyncio's loop
and on uvloop (the worker's), measured just before and just after the worker's run and
averaged. Their ratio is the share of raw HTTP throughput the worker keeps (target >=
50%). The worker's end is seen with one index probe every 20 ms, not a count of the
finished rows. Also: the worker's CPU
seconds per 1,000 polls and its resident memory, at concurrency 10, 100 and 1,000, and how
busy the machine's cores were meanwhile (the worker, its database and the remote share
them, and on a shared machine so does whatever else runs: compare ratios, not rates).

    python -m bench.worker_throughput [--tasks 20000] [--concurrency 10 100 1000]
                                      [--profile DIR]

``--profile DIR`` records the worker with py-spy (the bench extra) during each run:
DIR/worker-<concurrency>.svg, a flame graph.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import aiohttp
import psycopg
import uvloop

from bench.cluster import migrated_databases, queries, wait_for_completion
from bench.instant_remote import instant_remote
from bench.worker_bench import worker_process

_TICKS = os.sysconf("SC_CLK_TCK")


async def _plain_gets(base_url: str, count: int, concurrency: int) -> float:
    """GETs per second: `count` GETs, `concurrency` at a time, one keep-alive session."""
    urls = iter(f"{base_url}/status/{i}" for i in range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def fetch_all() -> None:
            for url in urls:
                async with session.get(url) as response:
                    response.raise_for_status()
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(fetch_all() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def _raw_rates(base_url: str, count: int, concurrency: int) -> tuple[float, float]:
    """_plain_gets on asyncio's loop and on uvloop."""
    return (asyncio.run(_plain_gets(base_url, count, concurrency)),
            uvloop.run(_plain_gets(base_url, count, concurrency)))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _machine_ticks() -> tuple[int, int]:
    """All CPU ticks so far, and the idle ones (idle + iowait), of the whole machine."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _backends_cpu(conn: psycopg.Connection) -> float:
    """CPU seconds so far of the database backends serving the worker's connections
    (the database runs on this machine)."""
    pids = conn.execute("select pid from pg_stat_activity"
                        " where application_name like 'taskman-worker%'").fetchall()
    total = 0.0
    for (pid,) in pids:
        with suppress(FileNotFoundError):  # a connection closed meanwhile
            total += _cpu_seconds(pid)
    return total


def _worker_run(database_url: str, base_url: str, count: int, concurrency: int,
                profile: Path | None) -> tuple[float, float, float, float, float]:
    """Tasks per second from creating `count` due tasks (one commit) to all of them
    completed; the worker's CPU seconds over that time and its database backends'; its
    resident memory (MB) after; the share of the machine's cores busy meanwhile."""
    env = {"TASKMAN_CONCURRENCY": str(concurrency),
           # One remote host here: let it have all the slots, as the baseline does.
           "TASKMAN_PER_HOST_CONCURRENCY": str(concurrency)}
    q = queries()
    with worker_process(database_url, **env) as process, \
            psycopg.connect(database_url, autocommit=True) as conn:
        spy = None if profile is None else subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
             str(process.pid), "--rate", "200",
             "--output", str(profile / f"worker-{concurrency}.svg")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before, db_before = _cpu_seconds(process.pid), _backends_cpu(conn)
        conn.execute(q["create_due_tasks"], {"base_url": base_url, "count": count})
        started, ticks_before = time.perf_counter(), _machine_ticks()
        wait_for_completion(conn, count)
        elapsed = time.perf_counter() - started
        ticks, idle = (a - b for a, b in zip(_machine_ticks(), ticks_before, strict=True))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes the flame graph and exits
            spy.wait(60)
        return (count / elapsed, _cpu_seconds(process.pid) - cpu_before,
                _backends_cpu(conn) - db_before, _rss_mb(process.pid),
                (ticks - idle) / max(ticks, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write a py-spy flame graph of the worker per concurrency")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    names = [f"bench_worker_{c}" for c in args.concurrency]
    print(f"{args.tasks:,} tasks done on first poll, one worker process, an instant remote")
    print(f"  {'concurrency':>11} {'aiohttp GETs/s':>15} {'on uvloop':>10}"
          f" {'worker tasks/s':>15} {'ratio':>6} {'uvloop':>6}"
          f" {'CPU s/1k polls':>15} {'its DB CPU s/1k':>16} {'RSS MB':>7} {'cores busy':>10}")
    with migrated_databases(*names) as urls, instant_remote() as base_url:
        for concurrency, name in zip(args.concurrency, names, strict=True):
            # The baseline before and after the worker's run, averaged: the machine's
            # speed drifts between runs, and this way both sides see the same drift.
            raw, raw_uvloop = _raw_rates(base_url, args.tasks, concurrency)
            rate, cpu, db_cpu, rss, busy = _worker_run(urls[name], base_url, args.tasks,
                                                        concurrency, args.profile)
            raw, raw_uvloop = ((a + b) / 2 for a, b in zip(
                (raw, raw_uvloop), _raw_rates(base_url, args.tasks, concurrency), strict=True))
            print(f"  {concurrency:>11} {raw:>15.0f} {raw_uvloop:>10.0f} {rate:>15.0f}"
                  f" {rate / raw:>6.0%} {rate / raw_uvloop:>6.0%}"
                  f" {cpu / args.tasks * 1000:>15.3f} {db_cpu / args.tasks * 1000:>16.3f}"
                  f" {rss:>7.0f} {busy:>10.0%}", flush=True)
    print("  (target: the worker keeps >= 50% of the raw rate; flat or better as concurrency"
          " grows)")


if __name__ == "__main__":
    main()
