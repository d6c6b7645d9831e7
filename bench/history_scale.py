"""History scale: the create path, the worker and a user's reads as finished tasks pile up.

The history is copied from one real finished task: created by a user through
create_task and completed by the worker on its first poll of an instant remote, its rows
in every table that keeps rows of a task are copied in bulk (INSERT ... SELECT, row
triggers off) for each new task, with its own id (UUIDv7 at its creation time when the
schema mints them, else v4), an owner (every other task one of 10 heavy users', the
others one of --users users', in turn), and every time shifted to its place in a
history spread evenly over the --days before the run. At each size (1k, 100k, 1M, 10M
finished tasks, up to --max):

- create_task one call at a time as a signed-in user, each call a PostgREST request
  (one durable transaction: SET LOCAL ROLE authenticated, the JWT claims, the call),
  the owners in the history's turns;
- the worker end to end: one process, concurrency 100, an instant remote; tasks per
  second from the commit that creates a batch to the last one completed;
- get_task_status by id as the owner, for the tasks just created and for tasks anywhere
  in the history (median of the statement's time);
- a heavy user's newest 50 tasks as PostgREST reads
  GET /tasks?order=created_at.desc&limit=50 (under RLS as `authenticated`; median; a
  heavy user has 50 tasks at 1k already);
- task_stats() as the service (median of three).

The tasks a measurement makes are deleted before the history grows again, so that the
history stays in time order in every index. The create and worker figures are the
median of --rounds runs. Ratios are to the 1k
figures (targets: create and worker at 10M >= 0.8x, the reads <= 2x).

    python -m bench.history_scale [--max 10000000] [--users 1000] [--days 7]
                                  [--creates 1000] [--worker-tasks 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.cluster import migrated_databases
from bench.cluster import queries as bench_queries
from bench.instant_remote import instant_remote
from bench.worker_bench import worker_process
from worker.db import api_session, parse_named_queries

SIZES = (1_000, 100_000, 1_000_000, 10_000_000)
CHUNK = 50_000  # history rows per transaction
SAMPLES = 200  # reads timed per figure
HEAVY = 10  # users who own every other task
FIGURES = ("create/s", "worker/s", "status new ms", "status any ms", "newest-50 ms",
           "task_stats ms")


@cache
def queries() -> dict[str, str]:
    return parse_named_queries(
        (Path(__file__).with_name("history_scale.sql")).read_text(encoding="utf-8"))


def user_id(n: int) -> str:
    """The n-th user, as the new_history query names them (the first HEAVY are heavy)."""
    digest = hashlib.md5(f"taskman-bench-user-{n}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def owner_of(i: int, users: int) -> str:
    """The owner of the i-th task, as new_history chooses it."""
    return user_id(i // 2 % HEAVY if i % 2 == 0 else HEAVY + i // 2 % users)


def _wait_until_idle(conn: psycopg.Connection) -> None:
    """Until no task is live: one look at the due index every 20 ms."""
    while conn.execute(bench_queries()["live_tasks_remain"]).fetchone()[0]:
        time.sleep(0.02)


class History:
    """The finished tasks of one database, grown in bulk from a template task through
    `conn` (a connection of its own: the row triggers are off there)."""

    def __init__(self, conn: psycopg.Connection, template: str, *, users: int, days: float,
                 final: int) -> None:
        q = queries()
        self.conn, self.template, self.users = conn, template, users
        self.v7 = conn.execute(q["mints_uuidv7"]).fetchone()[0]
        self.start = conn.execute(q["db_now"]).fetchone()[0] - timedelta(days=days)
        self.spacing = timedelta(days=days) / final
        self.copied = 1  # the template is the first
        conn.execute(bench_queries()["triggers_off"])
        conn.execute(q["new_history_table"])
        self.copies = []
        for name, columns, timed in conn.execute(q["copied_tables"]).fetchall():
            table = sql.SQL(name)  # a regclass text: already quoted where needed
            count = conn.execute(sql.SQL(q["template_rows"]).format(table=table),
                                 {"template": template}).fetchone()[0]
            if count:
                self.copies.append((name, count, sql.SQL(q["copy_rows"]).format(
                    table=table, columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    values=sql.SQL(", ").join(_value(c, t) for c, t in zip(columns, timed,
                                                                          strict=True)))))
        self.events = conn.execute(q["template_events"], {"template": template}).fetchone()[0]

    def describe(self) -> str:
        rows = ", ".join(f"{name} {count}" for name, count, _ in self.copies)
        return f"rows of a finished task: {rows} (events: {self.events})"

    def grow(self, count: int) -> None:
        """Copy the template `count` more times (history in time order)."""
        q = queries()
        first, last = self.copied, self.copied + count - 1
        for lo in range(first, last + 1, CHUNK):
            hi = min(lo + CHUNK - 1, last)
            with self.conn.transaction():
                self.conn.execute(q["new_history"], {
                    "v7": self.v7, "heavy": HEAVY, "users": self.users, "first": lo, "last": hi,
                    "start": self.start, "spacing": self.spacing, "template": self.template})
                for _, _, statement in self.copies:
                    self.conn.execute(statement, {"template": self.template})
                self.conn.execute(q["clear_new_history"])
        self.copied += count

    def time_of(self, i: int) -> datetime:
        return self.start + self.spacing * i


def _value(column: str, timed: bool) -> sql.Composable:
    if column == "task_id":
        return sql.SQL("n.task_id")
    if column in ("user_id", "owner"):
        return sql.SQL("n.user_id")
    if timed:
        return sql.SQL("tpl.{} + n.shift").format(sql.Identifier(column))
    return sql.SQL("tpl.{}").format(sql.Identifier(column))


def _template(url: str, api: psycopg.Connection, base_url: str) -> str:
    """A task created by user 0 and completed by the worker on its first poll."""
    with api_session(api, "authenticated", {"sub": user_id(0)}) as cur:
        task = cur.execute(queries()["create_task"],
                           {"poll_url": f"{base_url}/status/template"}).fetchone()[0]
    with worker_process(url, TASKMAN_CONCURRENCY="10"), \
            psycopg.connect(url, autocommit=True) as conn:
        _wait_until_idle(conn)
    return str(task["task_id"])


def _creates(api: psycopg.Connection, base_url: str, count: int, users: int,
             label: str) -> tuple[float, list[tuple[str, str]]]:
    """create_task calls per second, one PostgREST request each; the (task, owner) made."""
    made = []
    started = time.perf_counter()
    for k in range(count):
        owner = owner_of(k, users)
        with api_session(api, "authenticated", {"sub": owner}) as cur:
            task = cur.execute(queries()["create_task"],
                               {"poll_url": f"{base_url}/status/{label}-{k}"}).fetchone()[0]
        made.append((str(task["task_id"]), owner))
    return count / (time.perf_counter() - started), made


def _median_ms(api: psycopg.Connection, samples: list[tuple[str, str]], role: str,
               statement: str, args: Callable[[str], dict[str, Any]]) -> float:
    """The median time of `statement`, run once for each (value, owner) in a request of
    its owner (`role`), fetching what it returns."""
    times = []
    for value, owner in samples:
        with api_session(api, role, {"sub": owner} if owner else {}) as cur:
            started = time.perf_counter()
            cur.execute(statement, args(value)).fetchall()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _task_stats_ms(api: psycopg.Connection) -> float:
    """task_stats() as the service, median of three; NaN (and why) if it fails."""
    try:
        return _median_ms(api, [("", "")] * 3, "service_role", queries()["task_stats"],
                          lambda _: {})
    except psycopg.Error as error:
        print(f"  task_stats failed: {str(error).splitlines()[0]}", flush=True)
        return math.nan


def _worker_rate(url: str, conn: psycopg.Connection, base_url: str, count: int,
                 label: str) -> float:
    """Tasks per second through one worker, from the commit that creates `count` due tasks
    to the last one completed (the tasks already due are finished first)."""
    with worker_process(url, TASKMAN_CONCURRENCY="100", TASKMAN_PER_HOST_CONCURRENCY="100"):
        _wait_until_idle(conn)
        since = conn.execute(queries()["db_now"]).fetchone()[0]
        started = time.perf_counter()
        conn.execute(bench_queries()["create_due_tasks"],
                     {"base_url": f"{base_url}/worker/{label}", "count": count})
        _wait_until_idle(conn)
        elapsed = time.perf_counter() - started
    done = conn.execute(queries()["completed_since"], {"since": since}).fetchone()[0]
    if done < count:
        raise RuntimeError(f"only {done} of {count} tasks completed")
    return count / elapsed


def _by_id(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id}


def _measure(url: str, conn: psycopg.Connection, api: psycopg.Connection, history: History,
             base_url: str, args: argparse.Namespace, size: int) -> dict[str, float]:
    q = queries()
    rng = random.Random(size)
    anywhere = []
    for _ in range(SAMPLES):
        owner = user_id(rng.randrange(HEAVY + args.users))
        at = history.time_of(rng.randrange(history.copied))
        row = conn.execute(q["any_task_of"], {"user_id": owner, "at": at}).fetchone()
        if row:
            anywhere.append((str(row[0]), owner))
    creates = []
    for r in range(args.rounds):
        conn.execute(q["analyze"])
        creates.append(_creates(api, base_url, args.creates, args.users, f"{size}-{r}"))
    made = [task for _, tasks in creates for task in tasks]
    conn.execute(q["checkpoint"])
    figures = {
        "create/s": statistics.median(rate for rate, _ in creates),
        "status new ms": _median_ms(api, rng.sample(made, min(SAMPLES, len(made))),
                                    "authenticated", q["get_task_status"], _by_id),
        "status any ms": _median_ms(api, anywhere, "authenticated", q["get_task_status"], _by_id),
        "newest-50 ms": _median_ms(api, [("", user_id(rng.randrange(HEAVY)))
                                         for _ in range(SAMPLES)],
                                   "authenticated", q["newest_50"], lambda _: {}),
        "task_stats ms": _task_stats_ms(api),
    }
    rates = []
    for r in range(args.rounds):
        conn.execute(q["analyze"])
        rates.append(_worker_rate(url, conn, base_url, args.worker_tasks, f"{size}-{r}"))
    return {**figures, "worker/s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=SIZES[-1],
                        help="the largest history measured (finished tasks)")
    parser.add_argument("--users", type=int, default=1000, help="owners of the history")
    parser.add_argument("--days", type=float, default=7,
                        help="the history's span (within retention, and task_stats' period)")
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--worker-tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="create and worker runs per size (the median is printed)")
    args = parser.parse_args()
    sizes = [s for s in SIZES if s <= args.max]

    with migrated_databases("bench_history") as urls, instant_remote() as base_url, \
            psycopg.connect(urls["bench_history"], autocommit=True) as conn, \
            psycopg.connect(urls["bench_history"], autocommit=True) as loader, \
            psycopg.connect(psycopg.conninfo.make_conninfo(urls["bench_history"],
                                                           user="authenticator"),
                            autocommit=True) as api:
        url = urls["bench_history"]
        history = History(loader, _template(url, api, base_url), users=args.users,
                          days=args.days, final=sizes[-1])
        print(f"history scale: finished tasks spread over {args.days:g} days and"
              f" {HEAVY} + {args.users:,} users, ids {'UUIDv7' if history.v7 else 'UUIDv4'};"
              f" {history.describe()}")
        print(f"  create_task: {args.creates:,} calls, one PostgREST request each as a user;"
              f" worker: {args.worker_tasks:,} tasks, concurrency 100, instant remote"
              f" (median of {args.rounds});"
              " reads: median ms; (ratio to 1k)")
        print(f"  {'history':>10} {'events':>11} {'load s':>7} {'GiB':>6}  "
              + "  ".join(f"{name:>17}" for name in FIGURES))
        first: dict[str, float] = {}
        for size in sizes:
            started = time.perf_counter()
            history.grow(size - history.copied)
            conn.execute(queries()["settle"])
            conn.execute(queries()["checkpoint"])
            load = time.perf_counter() - started
            events, *_, db_bytes = conn.execute(queries()["sizes"]).fetchone()
            since = conn.execute(queries()["db_now"]).fetchone()[0]
            figures = _measure(url, conn, api, history, base_url, args, size)
            first = first or figures
            print(f"  {size:>10,} {events:>11,} {load:>7,.0f} {db_bytes / 2**30:>6.2f}  "
                  + "  ".join(f"{figures[n]:>10,.1f} {figures[n] / first[n]:>5.2f}x"
                              for n in FIGURES), flush=True)
            if size != sizes[-1]:
                conn.execute(queries()["forget_measured"], {"since": since})
                conn.execute(queries()["rebuild_indexes"])
                conn.execute(queries()["settle"])
        print(textwrap.fill("indexes, MiB (bytes per row): " + ", ".join(
            f"{name.split('.')[-1]} {size / 2**20:,.0f} ({per_row:.0f})"
            for name, size, per_row in conn.execute(queries()["index_sizes"]).fetchall()),
            width=100, initial_indent="  ", subsequent_indent="    "))
    print("  targets at 10M: create/s and worker/s >= 0.8x, get_task_status and newest-50"
          " <= 2x, task_stats <= 50 ms")


if __name__ == "__main__":
    main()
