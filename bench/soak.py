"""Soak: tasks created and finished continuously with a retention of one minute.

Every cycle creates a batch of tasks, polls them twice (running with progress, then
completed) through claim_due_tasks and record_poll_results, and every few seconds
the worker's retention batch runs with older_than = --retention seconds. Table and
index sizes are printed over time: they level off once retention catches up
(autovacuum reuses the space), taskman.tasks included (plain PostgreSQL: Realtime does
not stream it; README: Retention).

    python -m bench.soak [--seconds 150] [--retention 60] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg

from bench.cluster import migrated_databases, queries

TABLES = ("taskman.tasks", "taskman.task_events", "taskman_private.task_private",
          "taskman_private.task_schedule", "taskman_private.outbox")


def _poll_all(conn: psycopg.Connection, status: str, extra: dict) -> None:
    ids = [r[0] for r in conn.execute(
        "select task_id from taskman.claim_due_tasks('soak', 1000, 60)").fetchall()]
    if ids:
        conn.execute("select count(*) from taskman.record_poll_results(%s)", (json.dumps([
            {"task_id": str(i), "worker_id": "soak", "ok": True, "status": status,
             "http_status": 200, "latency_ms": 1.0, "delay_seconds": 0,
             "raw_response": "x" * 300, **extra} for i in ids]),))


def _sizes(conn: psycopg.Connection) -> list[str]:
    out = []
    for table in TABLES:
        heap, index = conn.execute(
            "select pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)",
            (table, table)).fetchone()
        out.append(f"{table.split('.')[1]} {heap / 1024:6.0f}+{index / 1024:5.0f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--retention", type=float, default=60)
    parser.add_argument("--rate", type=int, default=200, help="tasks created per second")
    args = parser.parse_args()
    q = queries()

    with migrated_databases("bench_soak") as urls, \
            psycopg.connect(urls["bench_soak"], autocommit=True) as conn:
        conn.execute("alter system set autovacuum_naptime = '5s'")
        conn.execute("select pg_reload_conf()")
        print(f"soak: {args.rate} tasks/s for {args.seconds:.0f}s, retention {args.retention:.0f}s;"
              " sizes in KiB, heap+indexes")
        started = last_prune = last_print = time.monotonic()
        created = pruned = 0
        while (now := time.monotonic()) - started < args.seconds:
            conn.execute(q["create_due_tasks"], {"base_url": "https://api.example.com",
                                                 "count": args.rate})
            created += args.rate
            _poll_all(conn, "in_progress", {"progress": 50})
            conn.execute("update taskman_private.task_schedule set next_poll_at = now()"
                         " where next_poll_at is not null")
            _poll_all(conn, "completed", {"result": {"ok": True}})
            if now - last_prune >= 5:
                while True:
                    row = conn.execute(
                        "select * from taskman.prune_finished_tasks("
                        "make_interval(secs => %s), 200, false)", (args.retention,)).fetchone()
                    pruned += row[0]
                    if row[-1]:
                        break
                last_prune = now
            if now - last_print >= 10:
                print(f"  t={now - started:4.0f}s created {created:7,} pruned {pruned:7,}  "
                      + "  ".join(_sizes(conn)))
                last_print = now
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        print(f"  end   created {created:7,} pruned {pruned:7,}  " + "  ".join(_sizes(conn)))


if __name__ == "__main__":
    main()
