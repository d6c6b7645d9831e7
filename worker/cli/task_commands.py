"""CLI commands that act on tasks: create, status, list, cancel, retry.

They connect with ``DATABASE_URL`` (a trusted service connection) and call the
same SQL functions as the edge. Bad input exits 2 with the database's message;
an unknown task or a refused transition exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from worker import db, store
from worker.domain import STATUSES, TERMINAL_STATUSES, TaskCreate
from worker.remote.netguard import NetworkPolicy
from worker.remote.url_policy import RefusedURL, check_task_urls, task_urls

EXIT_USAGE = 2
EXIT_REFUSED = 1


class CommandError(Exception):
    """A user-facing failure: ``message`` is printed, ``exit_code`` returned."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def open_database(conninfo: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one command; database refusals become CommandErrors."""
    try:
        with db.connect(conninfo, autocommit=True) as conn:
            yield conn
    except psycopg.Error as exc:
        if exc.sqlstate in ("22023", "22P02", "22003", "23514", "22007", "22008"):
            raise CommandError(exc.diag.message_primary or str(exc), EXIT_USAGE) from None
        if exc.sqlstate in ("PT404", "PT409", "PT403", "23505"):
            raise CommandError(exc.diag.message_primary or str(exc), EXIT_REFUSED) from None
        raise


def _json_arg(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{name} must be JSON: {exc.msg}") from None

    return parse


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def _task_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id (a UUID)") from None


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`rows` as an aligned text table of `columns`, headed in capitals."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and len(value) > 19 and value[10:11] == "T":
        return value[:19].replace("T", " ")  # an ISO timestamp, to the second
    return str(value)


def _show_task(task: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(task, indent=2, default=str))
        return
    fields = ["task_id", "status", "task_type", "external_id", "progress", "progress_message",
              "error_code", "error_message", "attempt_count", "created_at", "completed_at"]
    width = max(map(len, fields))
    for field in fields:
        if field in task:
            print(f"{field.ljust(width)}  {_cell(task[field])}")
    if task.get("result") is not None:
        print(f"{'result'.ljust(width)}  {json.dumps(task['result'])}")
    if task.get("callback_token"):
        print(f"{'callback_token'.ljust(width)}  {task['callback_token']}  (shown once)")


def cmd_create(conninfo: str, args: argparse.Namespace) -> int:
    """Create a task and print it (with its callback token, shown once)."""
    # Not validated here: the database checks every field and names it in its error.
    fields = TaskCreate.model_construct(
        poll_url=args.poll_url, poll_method=args.method, task_type=args.type,
        external_id=args.external_id, poll_headers=dict(args.header) or None,
        poll_body=args.body, poll_config=args.config, poll_interval_seconds=args.interval,
        max_attempts=args.max_attempts, timeout_minutes=args.timeout_minutes,
        callback_url=args.callback_url, idempotency_key=args.idempotency_key,
        metadata=args.metadata, submit_url=args.submit_url, submit_method=args.submit_method,
        submit_headers=dict(args.submit_header) or None, submit_body=args.submit_body,
        callback_headers=dict(args.callback_header) or None, start_at=args.start_at,
        priority=args.priority, heartbeat_seconds=args.heartbeat_seconds,
    )
    # The policy of this environment's settings: what the worker will apply.
    try:
        check_task_urls(task_urls(fields), NetworkPolicy.from_settings(args.settings))
    except RefusedURL as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    with open_database(conninfo) as conn:
        task = store.create_task(conn, fields)
    _show_task(task, args.json)
    return 0


def _get(conn: psycopg.Connection[Any], task_id: str) -> dict[str, Any]:
    task = store.get_task(conn, task_id)
    if task is None:
        raise CommandError(f"task {task_id} not found", EXIT_REFUSED)
    return task


def _progress_line(task: dict[str, Any]) -> str:
    done = task.get("progress") or 0
    bar = "#" * (done // 5) + "." * (20 - done // 5)
    note = task.get("progress_message") or ""
    return f"\r{task['status']:<11} [{bar}] {done:3d}% {note[:40]:<40}"


def cmd_status(conninfo: str, args: argparse.Namespace) -> int:
    """Show a task; with ``--wait``, follow it with a progress bar until it ends."""
    with open_database(conninfo) as conn:
        task = _get(conn, args.task_id)
        if args.wait:
            interactive = sys.stderr.isatty()
            while task["status"] not in TERMINAL_STATUSES:
                if interactive:
                    print(_progress_line(task), end="", file=sys.stderr, flush=True)
                time.sleep(1)
                task = _get(conn, args.task_id)
            if interactive:
                print(_progress_line(task), file=sys.stderr)
    _show_task(task, args.json)
    return 0 if not args.wait or task["status"] == "completed" else EXIT_REFUSED


def cmd_list(conninfo: str, args: argparse.Namespace) -> int:
    """List tasks, newest first, with optional status and type filters."""
    with open_database(conninfo) as conn:
        tasks = store.list_tasks(conn, limit=args.limit, statuses=args.status,
                                 task_type=args.type)
    if args.json:
        print(json.dumps(tasks, indent=2, default=str))
    elif tasks:
        print(format_table(tasks, ["task_id", "status", "task_type", "progress", "created_at"]))
    else:
        print("no tasks")
    return 0


def _transition(
    change: Callable[[psycopg.Connection[Any], str], dict[str, Any]],
) -> Callable[[str, argparse.Namespace], int]:
    def run(conninfo: str, args: argparse.Namespace) -> int:
        with open_database(conninfo) as conn:
            task = change(conn, args.task_id)
        _show_task(task, args.json)
        return 0

    return run


cmd_cancel = _transition(store.cancel_task)
cmd_retry = _transition(store.retry_task)


def add_task_commands(
    commands: argparse._SubParsersAction, wrap: Callable[[Callable[..., int]], Any]
) -> None:
    """Register create, status, list, cancel and retry; ``wrap`` adapts each handler."""
    create = commands.add_parser("create", help="create a task")
    create.add_argument("--poll-url", help="status URL to poll (omit to wait for a callback)")
    create.add_argument("--method", default=None, help="poll method (GET)")
    create.add_argument("--type", default=None, help="task type (generic)")
    create.add_argument("--external-id")
    create.add_argument("--header", action="append", type=_header, default=[],
                        metavar="'NAME: VALUE'", help="poll header (repeatable; kept secret)")
    create.add_argument("--body", type=_json_arg("--body"), help="poll body (JSON)")
    create.add_argument("--config", type=_json_arg("--config"), help="poll_config (JSON)")
    create.add_argument("--metadata", type=_json_arg("--metadata"), help="metadata (JSON)")
    create.add_argument("--interval", type=int, help="poll interval in seconds (30)")
    create.add_argument("--max-attempts", type=int, help="consecutive poll errors allowed (10)")
    create.add_argument("--timeout-minutes", type=int, help="deadline in minutes (120)")
    create.add_argument("--callback-url", help="notified when the task ends")
    create.add_argument("--idempotency-key")
    create.add_argument("--submit-url", help="Taskman starts the job: sent once, with "
                        "an Idempotency-Key (README: Taskman starts the job); its answer "
                        "gives the status URL")
    create.add_argument("--submit-method", help="submit method (POST)")
    create.add_argument("--submit-header", action="append", type=_header, default=[],
                        metavar="'NAME: VALUE'", help="submit header (repeatable; kept secret)")
    create.add_argument("--submit-body", type=_json_arg("--submit-body"),
                        help="submit body (JSON; {task_id} and {callback_url} are filled in)")
    create.add_argument("--callback-header", action="append", type=_header, default=[],
                        metavar="'NAME: VALUE'",
                        help="header sent with the completion callback (repeatable; kept secret)")
    create.add_argument("--start-at", help="first submit or poll at this time (ISO 8601)")
    create.add_argument("--priority", type=int, help="-100..100 (0): higher goes first")
    create.add_argument("--heartbeat-seconds", type=int,
                        help="fail a started task silent this long (heartbeat_timeout)")
    create.set_defaults(run=wrap(cmd_create))

    status = commands.add_parser("status", help="show a task")
    status.add_argument("task_id", type=_task_id)
    status.add_argument("--wait", action="store_true", help="follow until the task ends")
    status.set_defaults(run=wrap(cmd_status))

    listing = commands.add_parser("list", help="list tasks, newest first")
    listing.add_argument("--status", action="append",
                         choices=STATUSES)
    listing.add_argument("--type")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=wrap(cmd_list))

    for name, handler, text in (("cancel", cmd_cancel, "cancel a live task"),
                                ("retry", cmd_retry, "run a failed or cancelled task again")):
        command = commands.add_parser(name, help=text)
        command.add_argument("task_id", type=_task_id)
        command.set_defaults(run=wrap(handler))

    for command in (create, status, listing, *(commands.choices[n] for n in ("cancel", "retry"))):
        command.add_argument("--json", action="store_true", help="print JSON")
