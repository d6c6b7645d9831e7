"""CLI command ``taskman realtime``: how task changes reach browsers through Supabase Realtime.

``taskman realtime`` prints the mode in force; ``taskman realtime broadcast`` switches to
Realtime Broadcast (a private topic per owner; retention deletes whole tasks; a new install's
mode) and ``taskman realtime changes`` to Postgres Changes on ``taskman.tasks``, whose cost
both say: retention then keeps every finished task row. README: Realtime.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from worker import store
from worker.cli.task_commands import open_database

# What Postgres Changes costs, said where it is chosen.
CHANGES_COST = ("while Supabase Realtime streams taskman.tasks, retention keeps every finished"
                " task row for ever (a DELETE would reach every subscriber); Supabase"
                " recommends Broadcast for scale and security")

_MEANING = {
    "changes": f"Postgres Changes on taskman.tasks; {CHANGES_COST}",
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
        "realtime", help="show or switch how Supabase Realtime carries task changes",
        description="Show or switch how Supabase Realtime carries task changes. broadcast"
                    " (a new install's mode): each change goes to the private topic"
                    " taskman:tasks:<user id>; retention deletes whole tasks. changes:"
                    f" Postgres Changes on taskman.tasks; {CHANGES_COST}.")
    command.add_argument("mode", nargs="?", choices=["changes", "broadcast"],
                         help="switch to Postgres Changes (retention then keeps every"
                              " finished task row) or to Broadcast")
    command.set_defaults(run=wrap(cmd_realtime))
