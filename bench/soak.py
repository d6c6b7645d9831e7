"""Soak: tasks created and finished continuously with a retention of one minute, in each
Realtime mode that lets retention delete whole tasks.

Every cycle creates a batch of tasks, polls them twice (running with progress, then
completed) through claim_due_tasks and record_poll_results, and every few seconds
the worker's retention batch runs with older_than = --retention seconds. Each mode gets a
new install of its own: broadcast on a database made to look like a Supabase project's
(Realtime there before the migrations, tests/supabase_realtime.py), none on plain
PostgreSQL. Printed over time: heap+index sizes of taskman.tasks and the other task
tables, and the dead tuples and autovacuum runs of taskman.tasks. Sizes level off once
retention catches up and autovacuum reuses the space (README: Retention). Autovacuum
runs with the server's defaults unless --naptime says otherwise.

    python -m bench.soak [--seconds 150] [--retention 60] [--rate 200] [--modes broadcast,none]
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg
from psycopg import sql

from bench.cluster import migrated_databases, queries
from tests.supabase_realtime import emulate_supabase_realtime
from worker.migrate import migrate

TABLES = ("taskman.tasks", "taskman.task_events", "taskman_private.task_private",
          "taskman_private.task_schedule", "taskman_private.outbox",
          "taskman_private.retention_deferred")
MODES = ("broadcast", "none")


def _poll_all(conn: psycopg.Connection, status: str, extra: dict) -> None:
    ids = [r[0] for r in conn.execute(
        "select task_id from taskman.claim_due_tasks('soak', 1000, 60)").fetchall()]
    if ids:
        conn.execute("select count(*) from taskman.record_poll_results(%s)", (json.dumps([
            {"task_id": str(i), "worker_id": "soak", "ok": True, "status": status,
             "http_status": 200, "latency_ms": 1.0, "delay_seconds": 0,
             "raw_response": "x" * 300, **extra} for i in ids]),))


def _sizes(conn: psycopg.Connection) -> str:
    out = []
    for table in TABLES:
        heap, index = conn.execute(
            "select pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)",
            (table, table)).fetchone()
        out.append(f"{table.split('.')[1]} {heap / 1024:5.0f}+{index / 1024:5.0f}")
    live, dead, vacuums = conn.execute(
        "select n_live_tup, n_dead_tup, autovacuum_count from pg_stat_user_tables"
        " where relid = 'taskman.tasks'::regclass").fetchone()
    return "  ".join(out) + f"  | tasks live {live:6,} dead {dead:6,} autovacuums {vacuums}"


def _new_install(server: psycopg.Connection, url: str, mode: str) -> str:
    """A database beside ``url``'s with Taskman newly installed, in ``mode`` by default."""
    name = f"bench_soak_{mode}"
    server.execute(f"create database {name}")
    target = psycopg.conninfo.make_conninfo(url, dbname=name)
    if mode == "broadcast":
        with psycopg.connect(target, autocommit=True) as conn:
            emulate_supabase_realtime(conn)
    migrate(target)
    return target


def soak(url: str, mode: str, args: argparse.Namespace) -> None:
    """Create and finish ``args.rate`` tasks a second for ``args.seconds``, pruning."""
    q = queries()
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("select taskman.realtime_mode()").fetchone()[0]
        if found != mode:
            raise RuntimeError(f"a new install is in mode {found}, not {mode}")
        print(f"mode {mode}: {args.rate} tasks/s for {args.seconds:.0f}s, retention"
              f" {args.retention:.0f}s; sizes in KiB, heap+indexes")
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
            if now - last_print >= args.every:
                print(f"  t={now - started:4.0f}s created {created:7,} pruned {pruned:7,}  "
                      + _sizes(conn), flush=True)
                last_print = now
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        print(f"  end    created {created:7,} pruned {pruned:7,}  " + _sizes(conn), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150, help="per mode")
    parser.add_argument("--retention", type=float, default=60)
    parser.add_argument("--rate", type=int, default=200, help="tasks created per second")
    parser.add_argument("--every", type=float, default=10, help="seconds between prints")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="Realtime modes to soak in, of " + ", ".join(MODES))
    parser.add_argument("--naptime", help="autovacuum_naptime (default: the server's, 1min)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: each must be one of {', '.join(MODES)}")

    with migrated_databases("bench_soak") as urls, \
            psycopg.connect(urls["bench_soak"], autocommit=True) as server:
        if args.naptime:
            server.execute(sql.SQL("alter system set autovacuum_naptime = {}").format(
                sql.Literal(args.naptime)))
            server.execute("select pg_reload_conf()")
        for mode in modes:
            soak(_new_install(server, urls["bench_soak"], mode), mode, args)


if __name__ == "__main__":
    main()
