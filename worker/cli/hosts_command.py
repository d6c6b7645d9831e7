"""CLI command ``taskman hosts``: remote hosts holding tasks back, and closing a circuit.

``taskman hosts`` lists hosts with an open circuit, a Retry-After pause, a rate limit
or recent failures, with how many owners' own circuits or pauses hold them there and how
many live tasks wait on each (the dashboard's panel).
``taskman hosts reset <host>`` closes a host's circuit by hand, and every owner's on it:
its tasks resume,
spread over ``TASKMAN_HOST_RESUME_SPREAD``, and Slack hears that it closed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from worker import store
from worker.cli.task_commands import EXIT_USAGE, CommandError, format_table, open_database
from worker.remote.host_keys import host_key

_COLUMNS = ["host", "state", "since", "next_probe_at", "paused_until", "rate_limit",
            "consecutive_failures", "last_error", "owners_held", "tasks_waiting"]


def cmd_hosts(conninfo: str, args: argparse.Namespace) -> int:
    """List the hosts that hold tasks back or are failing."""
    with open_database(conninfo) as conn:
        hosts = store.host_status(conn)
    if args.json:
        print(json.dumps(hosts, indent=2))
    elif hosts:
        print(format_table(hosts, _COLUMNS))
    else:
        print("no host is failing, paused or rate-limited")
    return 0


def cmd_hosts_reset(conninfo: str, args: argparse.Namespace) -> int:
    """Close ``args.host``'s circuit (a host key as listed, or any URL on the host)."""
    key = host_key(args.host) if "://" in args.host else None
    if key is None:
        raise CommandError(f"{args.host!r} is not a host: give it as `taskman hosts` lists "
                           "it, like https://api.example.com:443", EXIT_USAGE)
    with open_database(conninfo) as conn:
        row = store.reset_host(conn, key, args.settings.host_resume_spread_seconds)
    if row is None:
        raise CommandError(f"no such host: {key} (`taskman hosts` lists the known ones)",
                           EXIT_USAGE)
    print(f"{key}: circuit closed; its tasks resume")
    return 0


def add_hosts_command(
    commands: argparse._SubParsersAction, wrap: Callable[[Callable[..., Any]], Any]
) -> None:
    """Register ``hosts`` and ``hosts reset``; ``wrap`` adapts the handlers as for the task
    commands."""
    command = commands.add_parser(
        "hosts", help="list remote hosts that hold tasks back (open circuit, pause, rate limit)")
    command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(run=wrap(cmd_hosts))
    actions = command.add_subparsers(dest="action", metavar="ACTION")
    reset = actions.add_parser("reset", help="close a host's circuit by hand")
    reset.add_argument("host", help="the host as `taskman hosts` lists it "
                                    "(https://api.example.com:443), or a URL on it")
    reset.set_defaults(run=wrap(cmd_hosts_reset))
