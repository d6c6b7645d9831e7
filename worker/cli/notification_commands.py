"""CLI command ``taskman notifications``: alerts and callbacks that are failing or given up.

A delivery that keeps failing is retried with backoff and given up (dead-lettered)
after ``TASKMAN_OUTBOX_MAX_ATTEMPTS``; its attempts are also in the task's events.
This lists them with their last error (service-side text), for operators.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from worker import store
from worker.cli.task_commands import format_table, open_database

_SHOWN_ERROR = 60


def cmd_notifications(conninfo: str, args: argparse.Namespace) -> int:
    """List failing and given-up deliveries, newest first."""
    with open_database(conninfo) as conn:
        rows = store.troubled_notifications(conn, args.state, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif rows:
        shown = [r | {"last_error": _short(r["last_error"])} for r in rows]
        print(format_table(shown, ["outbox_id", "task_id", "channel", "state", "attempts",
                             "next_attempt_at", "given_up_at", "last_error"]))
    else:
        print("no failing or given-up notifications")
    return 0


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= _SHOWN_ERROR:
        return text
    return text[: _SHOWN_ERROR - 1] + "…"


def add_notification_commands(
    commands: argparse._SubParsersAction, wrap: Callable[[Callable[..., Any]], Any]
) -> None:
    """Register ``notifications``; ``wrap`` adapts the handler as for the task commands."""
    command = commands.add_parser(
        "notifications", help="list alerts and callbacks that are failing or were given up")
    state = command.add_mutually_exclusive_group()
    state.add_argument("--given-up", dest="state", action="store_const", const="given_up",
                       help="only deliveries given up after their attempts")
    state.add_argument("--failing", dest="state", action="store_const", const="failing",
                       help="only deliveries still being retried")
    command.add_argument("--limit", type=int, default=50)
    command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(run=wrap(cmd_notifications), state=None)
