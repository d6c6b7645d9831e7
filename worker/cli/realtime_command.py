"""CLI command ``taskman realtime``: how task changes reach browsers through Supabase Realtime.

``taskman realtime`` prints the mode in force; ``taskman realtime broadcast`` switches to
Realtime Broadcast (a private topic per owner; retention then deletes whole tasks) and
``taskman realtime changes`` back to Postgres Changes on ``taskman.tasks`` (retention keeps
the task rows). README: Realtime.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from worker import store
from worker.cli.task_commands import open_database

_MEANING = {
    "changes": "Postgres Changes on taskman.tasks; while Supabase Realtime streams it,"
               " retention keeps finished task rows",
    "broadcast": "Broadcast on the private topic taskman:tasks:<user id>;"
                 " retention deletes whole tasks",
    "none": "Realtime does not carry task changes; retention deletes whole tasks",
}


def cmd_realtime(conninfo: str, args: argparse.Namespace) -> int:
    """Print the mode, after switching to ``args.mode`` when one is given."""
    with open_database(conninfo) as conn:
        mode = (store.set_realtime_mode(conn, args.mode) if args.mode
                else store.realtime_mode(conn))
    print(f"realtime: {mode} ({_MEANING[mode]})")
    return 0


def add_realtime_command(commands: argparse._SubParsersAction,
                         wrap: Callable[[Callable[..., Any]], Any]) -> None:
    """Register ``realtime``; ``wrap`` adapts the handler as for the task commands."""
    command = commands.add_parser(
        "realtime", help="show or switch how Supabase Realtime carries task changes")
    command.add_argument("mode", nargs="?", choices=["changes", "broadcast"],
                         help="switch to Postgres Changes or to Broadcast")
    command.set_defaults(run=wrap(cmd_realtime))
