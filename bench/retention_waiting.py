"""Retention while many finished tasks wait for their notifications.

A finished task whose notification is still pending (its receiver down for days, up to
TASKMAN_OUTBOX_MAX_AGE_HOURS) waits in retention_deferred. A round of the worker's
retention job prunes, in batches of 200, the tasks that reached the period since the last
round, and takes those waiting tasks that can go now. Measured in one run, rounds taking
turns, each pruning --new tasks:

- nobody waiting (the limit);
- --waiting tasks waiting (Taskman);
- the same with the previous prune_finished_tasks (20261202000900), which read every
  waiting task in every batch of a round.

    python -m bench.retention_waiting [--waiting 100000] [--new 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import psycopg

from bench.cluster import fill_tasks, migrated_databases, queries
from worker import store
from worker.migrate import MIGRATIONS_DIR
from worker.polling.retention import RETENTION_BATCH

_PERIOD_SECONDS = 30 * 86_400
_PREVIOUS = "20261202000900_retention_passes_no_held_task.sql"


def _previous_prune() -> str:
    """prune_finished_tasks as it was before it read the waiting tasks once a round."""
    text = (MIGRATIONS_DIR / _PREVIOUS).read_text(encoding="utf-8")
    start = text.index("create or replace function taskman.prune_finished_tasks")
    return text[start:text.index("$$;", text.index("as $$", start) + 5) + 3]


def _wait_for_notifications(url: str, count: int) -> None:
    """`count` finished tasks past the period, each with a pending callback, that
    retention has passed."""
    if count:
        fill_tasks(url, terminal=count)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(queries()["wait_for_notifications"])


def _round(url: str, conn: psycopg.Connection, new: int) -> tuple[float, int]:
    """Seconds of one retention round (the worker's batches) after `new` more tasks
    reached the period, and how many tasks it pruned."""
    fill_tasks(url, terminal=new)
    conn.execute(queries()["age_new_finished_tasks"])
    started, pruned = time.perf_counter(), 0
    while True:
        row = store.prune_finished_tasks(conn, _PERIOD_SECONDS, RETENTION_BATCH)
        pruned += row["tasks"]
        if row["done"]:
            return time.perf_counter() - started, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=2_000, help="tasks a round prunes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    waiting = {"limit": 0, "Taskman": args.waiting, "previous": args.waiting}

    with migrated_databases("bench_none", "bench_waiting", "bench_previous") as urls:
        dbs = dict(zip(waiting, urls.values(), strict=True))
        conns = {}
        try:
            for name, url in dbs.items():
                _wait_for_notifications(url, waiting[name])
                conns[name] = psycopg.connect(url, autocommit=True)
            conns["previous"].execute(_previous_prune())
            for conn in conns.values():
                conn.execute("vacuum analyze")
            seconds = dict.fromkeys(waiting, 0.0)
            for _ in range(args.rounds):
                for name, conn in conns.items():
                    took, pruned = _round(dbs[name], conn, args.new)
                    if pruned != args.new:
                        raise RuntimeError(f"{name}: a round pruned {pruned}, not {args.new}")
                    seconds[name] += took
        finally:
            for conn in conns.values():
                conn.close()

    print(f"retention rounds, each pruning {args.new:,} new tasks in batches of "
          f"{RETENTION_BATCH}, "
          f"mean of {args.rounds}:")
    limit = seconds["limit"] / args.rounds
    for name, count in waiting.items():
        mean = seconds[name] / args.rounds
        label = f"{name}, {count:,} waiting:" if count else "nobody waiting (the limit):"
        print(f"  {label:<30} {mean * 1000:8.1f} ms a round"
              f"   {mean / limit:5.1f}x the limit")


if __name__ == "__main__":
    main()
