"""Callbacks as fast as completions: the outbox against plain aiohttp POSTs, in one run.

One worker process (production defaults, a callback secret, concurrency 100 and one
receiver host allowed all of it, as the baseline) delivers completion callbacks to
bench.callback_receiver (its own process, answers 200 at once, notes each arrival).
In the same run, against the same receiver:

- the bare client: the same number of POSTs of a task-sized JSON body with aiohttp at
  concurrency 100, one keep-alive session, no database, before the worker starts and
  after it stops (their average is the baseline);
- a backlog: that many tasks with a ``callback_url`` completed in one transaction;
  callbacks per second from its commit (when the rows exist) to the last arrival,
  and its ratio to the bare client (target >= 60%);
- a burst: as many completed in 20 transactions within about 0.5 s (so at most about
  4,000 a second: the rate shows whether delivery keeps pace); latency from each
  task's end (taken just before its completing statement, so a little pessimistic)
  to its callback's arrival, p50 and p99 (target p99 < 2 s);
- meanwhile, polls of running tasks (``--running`` of them, polled every second) go on:
  their rate during the burst against the same worker's rate just before
  (target >= 80%), and during the backlog's drain;
- single completions into an idle outbox, one at a time: latency p50 and p99
  (target p50 < 50 ms).

``--profile`` drains a second backlog as large under py-spy (the bench extra) and
pg_stat_statements, and prints where one delivery's time goes: the worker's CPU per
delivery split by phase (claim, body, signing, send, record, the rest) from py-spy's
samples, and its database statements' execution time and backends' CPU per delivery.

    python -m bench.outbox_throughput [--callbacks 2000] [--running 200] [--singles 30]
                                      [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
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


_TICKS = os.sysconf("SC_CLK_TCK")
# A py-spy sample's phase: the first of these with a (function, file) on its stack
# ("*": any function of the file) ("send" also takes aiohttp's own frames, which
# read answers from the event loop's callbacks, off any delivery's stack).
PHASES = [
    ("signing", {("*", "signing.py"), ("_signed", "completion_callbacks.py"),
                 ("sign", "completion_callbacks.py")}),
    ("body", {("callback_body", "completion_callbacks.py")}),
    ("claim", {("_claim", "outbox.py"), ("_claim_loop", "outbox.py")}),
    ("record", {("_record", "outbox.py"), ("_record_loop", "outbox.py")}),
    ("send", {("deliver", "completion_callbacks.py")}),
    ("stream", {("_sender", "outbox.py")}),
]
PHASE_NAMES = [*(name for name, _ in PHASES), "send (aiohttp)", "polls", "loop, other"]
SPY_RATE = 250
# The worker's statements and those they run, by time spent.
STATEMENTS = r"""
select toplevel, calls, total_exec_time, rows, regexp_replace(query, '\s+', ' ', 'g')
from pg_stat_statements
where calls > 0 and query !~ 'pg_stat_statements'
order by total_exec_time desc limit 12
"""


def _phase(frames: list[tuple[str, str]]) -> str:
    """The phase of one sample's stack (outermost frame first)."""
    for name, marks in PHASES:
        if any((function.rpartition(".")[2], Path(file).name) in marks
               or ("*", Path(file).name) in marks for function, file in frames):
            return name
    files = [file for _, file in frames]
    if any(f.startswith(("aiohttp/", "yarl/", "multidict/")) for f in files):
        return "send (aiohttp)"
    if any(f.startswith("worker/polling/") or f.startswith("worker/remote/") for f in files):
        return "polls"
    return "loop, other"


def _samples(raw: Path) -> Counter[str]:
    """py-spy's raw output (``frame;frame;... count`` lines) counted by phase."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";")[1:]:  # the first is the thread
            function, _, where = frame.partition(" (")
            frames.append((function, where.rstrip(")").split(":")[0]))
        counts[_phase(frames)] += int(count)
    return counts


def _machine_ticks() -> tuple[int, int]:
    """All CPU ticks so far, and the idle ones (idle + iowait), of the whole machine."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _backends_cpu(conn: psycopg.Connection) -> float:
    """CPU seconds so far of the worker's database backends (on this machine)."""
    total = 0.0
    for (pid,) in conn.execute("select pid from pg_stat_activity"
                               " where application_name like 'taskman-worker%'"):
        with suppress(FileNotFoundError):
            total += _cpu_seconds(pid)
    return total


def _spy(pid: int, raw: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                             "--pid", str(pid), "--rate", str(SPY_RATE), "--format", "raw",
                             "--nolineno", "--output", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _backlog(conn: psycopg.Connection, receiver: str, remote: str, backlog: list[str],
             profile: list[str] | None = None,
             worker_pid: int = 0) -> tuple[float, float, float, float]:
    """Complete `backlog` in one transaction and wait for its callbacks: callbacks per
    second from its commit, how long it took, polls per second meanwhile, and over how
    long. With `profile`, the worker is sampled meanwhile and the lines saying where the
    deliveries' time went are added to it."""
    time.sleep(1)
    asyncio.run(arrivals(remote))
    if profile is not None:
        raw = Path(tempfile.mkdtemp(prefix="outbox-profile-")) / "worker.txt"
        spy = _spy(worker_pid, raw)
        time.sleep(0.5)  # py-spy attaches
        cpu, db_cpu, ticks = _cpu_seconds(worker_pid), _backends_cpu(conn), _machine_ticks()
    backlog_end = _complete(conn, backlog)
    committed = time.time() - backlog_end
    if profile is not None:
        conn.execute("select pg_stat_statements_reset()")  # the worker's statements only
    drained = _wait_for(receiver, set(backlog))
    backlog_last = max(drained["first"].values())
    drain = backlog_last - backlog_end - committed
    rate = len(backlog) / drain
    polls = asyncio.run(arrivals(remote))["gets"]
    window = max(1.0, backlog_last - backlog_end)
    if profile is not None:
        cpu, db_cpu = _cpu_seconds(worker_pid) - cpu, _backends_cpu(conn) - db_cpu
        total, idle = (a - b for a, b in zip(_machine_ticks(), ticks, strict=True))
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
        spy.wait(60)
        profile += _profile_lines(conn, _samples(raw), len(backlog), drain, cpu, db_cpu,
                                  (total - idle) / max(total, 1))
        profile.append(f"  (py-spy's samples, collapsed stacks: {raw})")
    return rate, committed, sum(backlog_end <= t <= backlog_end + window
                                for t in polls) / window, window


def _profile_lines(conn: psycopg.Connection, samples: Counter[str], count: int, drain: float,
                   cpu: float, db_cpu: float, busy: float) -> list[str]:
    """Where the worker's CPU went by phase (its samples' shares of its CPU seconds, from
    just before the backlog's transaction to its last callback: polls go on meanwhile),
    and its database's."""
    total = sum(samples.values()) or 1
    lines = [f"  where a delivery's time goes (a backlog of {count:,} drained in {drain:.2f} s;"
             f" the machine's cores {busy:.0%} busy):",
             f"    CPU: the worker {cpu / count * 1e6:.0f} us/delivery, its database backends"
             f" {db_cpu / count * 1e6:.0f} us/delivery",
             f"    the worker's by phase (py-spy, {total:,} samples, from just before the"
             " commit: the polls go on meanwhile):"]
    for name in PHASE_NAMES:
        share = samples[name] / total
        lines.append(f"      {name:<16} {share:>5.0%}"
                     f" {share * cpu / count * 1e6:>6.0f} us/delivery")
    lines.append("    its database statements (pg_stat_statements, nested ones indented):"
                 " calls, rows, us/delivery")
    for top, calls, total_ms, rows, query in conn.execute(STATEMENTS):
        lines.append(f"      {calls:>6} {rows:>6} {total_ms * 1000 / count:>6.0f}"
                     f"  {'' if top else '  '}{query[:80]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=2_000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--singles", type=int, default=30)
    parser.add_argument("--profile", action="store_true",
                        help="profile a second backlog (py-spy and pg_stat_statements)")
    args = parser.parse_args()

    env = {"TASKMAN_CONCURRENCY": str(CONCURRENCY),
           # One receiver host here: let it have all the slots, as the baseline does.
           "TASKMAN_PER_HOST_CONCURRENCY": str(CONCURRENCY),
           "TASKMAN_CALLBACK_SECRET": "bench-secret",
           # Running tasks are polled every second, without adaptive back-off.
           "TASKMAN_MAX_POLL_INTERVAL": "1"}
    settings = ({"shared_preload_libraries": "pg_stat_statements",
                 "pg_stat_statements.track": "all"} if args.profile else {})
    with migrated_databases("bench_outbox", settings=settings) as urls, \
            callback_receiver() as receiver, callback_receiver() as remote:
        url = urls["bench_outbox"]
        asyncio.run(_bare_posts(receiver, 500))  # warm up
        bare = asyncio.run(_bare_posts(receiver, args.callbacks))
        asyncio.run(arrivals(receiver))  # forget the bare client's
        with psycopg.connect(url, autocommit=True) as conn:
            singles = _callback_tasks(conn, f"{receiver}/single", args.singles)
            burst = _callback_tasks(conn, f"{receiver}/burst", args.callbacks)
            backlog = _callback_tasks(conn, f"{receiver}/backlog", args.callbacks)
            if args.profile:
                profiled = _callback_tasks(conn, f"{receiver}/profiled", args.callbacks)
                conn.execute("create extension pg_stat_statements")
            with worker_process(url, **env) as worker:
                # Single completions into an idle outbox.
                single_latency = []
                for task_id in singles:
                    time.sleep(0.1)
                    at = _complete(conn, [task_id])
                    noted = _wait_for(receiver, {task_id})
                    single_latency.append(noted["first"][task_id] - at)

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
                backlog_rate, committed, backlog_polls, backlog_window = _backlog(
                    conn, receiver, remote, backlog)
                profile: list[str] = []
                if args.profile:
                    _backlog(conn, receiver, remote, profiled, profile, worker.pid)
        # Again once the worker has stopped: the machine's speed drifts within a run, and
        # the average of before and after sees the drift the backlog saw.
        bare_after = asyncio.run(_bare_posts(receiver, args.callbacks))
        bare_before, bare = bare, (bare + bare_after) / 2

    first_end = min(ended.values())
    last_arrival = max(noted["first"].values())
    rate = len(burst) / (last_arrival - first_end)
    latency = [noted["first"][t] - ended[t] for t in burst]
    window = max(1.0, last_arrival - first_end)
    burst_polls = sum(first_end <= t <= first_end + window for t in polls_during) / window

    print(f"Callbacks: one worker, concurrency {CONCURRENCY}, a local receiver answering 200"
          " at once")
    print(f"  bare aiohttp POSTs/s to the same receiver        {bare:>8.0f}   ({bare_before:.0f}"
          f" before the worker ran, {bare_after:.0f} after)")
    print(f"  backlog of {len(backlog):,} completed at once: callbacks/s      "
          f"{backlog_rate:>8.0f}   ratio {backlog_rate / bare:.0%}  (target >= 60%;"
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
    print("\n".join(profile))


if __name__ == "__main__":
    main()
