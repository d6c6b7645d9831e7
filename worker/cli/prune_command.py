"""CLI command ``taskman prune``: apply retention once, now.

``taskman prune --older-than 7d`` deletes, in small batches, the tasks that ended more
than 7 days ago with their history, private and schedule rows and their delivered or
given-up notifications (the worker does the same every minute with
``TASKMAN_RETENTION_DAYS``), then the host rows with nothing to keep and the host alerts
delivered or given up as long ago, and says how many rows went. While Supabase Realtime
streams ``taskman.tasks`` the task rows stay and it says so. ``--dry-run`` counts them and
changes nothing.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from worker import store
from worker.cli.task_commands import open_database

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_BATCH = 500
_KINDS = (("task_rows", "task rows"), ("events", "events"),
          ("private_rows", "private rows"), ("schedule_rows", "schedule rows"),
          ("outbox_rows", "delivered notifications"))


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` (or a bare number of days) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age like 7d, 12h, 30m, 90s or 2w")
    return float(match[1]) * _UNITS[match[2] or "d"]


def cmd_prune(conninfo: str, args: argparse.Namespace) -> int:
    totals = {"tasks": 0, **{kind: 0 for kind, _ in _KINDS}}
    with open_database(conninfo) as conn:
        while True:
            row = store.prune_finished_tasks(conn, args.older_than, _BATCH,
                                             dry_run=args.dry_run)
            for key in totals:
                totals[key] += row[key]
            if row["done"] or args.dry_run:
                break
        rows_kept = row["rows_kept"]
        hosts = alerts = 0
        while True:
            row = store.prune_idle_hosts(conn, args.older_than, _BATCH, dry_run=args.dry_run)
            hosts, alerts = hosts + row["hosts"], alerts + row["alerts"]
            if row["done"]:
                break
    counts = ", ".join(f"{totals[kind]:,} {label}" for kind, label in _KINDS)
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{verb} {totals['tasks']:,} finished tasks: {counts}")
    print(f"{verb} {hosts:,} idle hosts and {alerts:,} host alerts delivered or given up")
    if rows_kept:
        print("task rows kept: Supabase Realtime streams taskman.tasks and would send every"
              " deleted row to every subscriber; `taskman realtime broadcast` lets them go"
              " (README: Retention)")
    return 0


def add_prune_command(commands: argparse._SubParsersAction,
                      wrap: Callable[[Callable[..., Any]], Any]) -> None:
    """Register ``prune``; ``wrap`` adapts the handler as for the task commands."""
    command = commands.add_parser(
        "prune", help="delete finished tasks (and their history) older than an age")
    command.add_argument("--older-than", type=parse_age, required=True, metavar="AGE",
                         help="tasks that ended longer ago than this (7d, 12h, 30m, 2w)")
    command.add_argument("--dry-run", action="store_true",
                         help="count what would go; change nothing")
    command.set_defaults(run=wrap(cmd_prune))
