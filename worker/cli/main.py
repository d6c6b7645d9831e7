"""The ``taskman`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import psycopg
from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker import migrate as migrations
from worker.cli.hosts_command import add_hosts_command
from worker.cli.notification_commands import add_notification_commands
from worker.cli.prune_command import add_prune_command
from worker.cli.realtime_command import add_realtime_command
from worker.cli.task_commands import CommandError, add_task_commands
from worker.config import Settings
from worker.db import ConfigurationError

DEFAULT_PORT = 8080


def database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded default when it is unset."""
    if settings.database_url:
        return settings.database_url
    from worker.devtools.embedded import embedded_database_url

    print("Using the embedded PostgreSQL (DATABASE_URL is not set)...", file=sys.stderr)
    return embedded_database_url()


EXPOSE_REMINDER = (
    "Clients reach Taskman in schema {schema} (supabase.schema('{schema}')). {state} On "
    "Supabase, add it under Project Settings -> Data API -> Exposed schemas (README: "
    "Install on Supabase)."
)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    conninfo = database_url(settings)
    if args.check:
        pending = migrations.pending_migrations(conninfo)
        for migration in pending:
            print(f"pending {migration.version} {migration.name}")
        if not pending:
            print("database is up to date")
        return 1 if pending else 0
    applied = migrations.migrate(conninfo)
    for migration in applied:
        print(f"applied {migration.version} {migration.name}")
    if not applied:
        print("database is up to date")
    exposed = migrations.api_schema_exposed(conninfo)
    if not exposed:
        state = ("This database's PostgREST settings do not list it." if exposed is False
                 else "This database cannot tell whether PostgREST exposes it.")
        print(EXPOSE_REMINDER.format(schema=migrations.API_SCHEMA, state=state))
    return 0


def migrated(conninfo: str, command: str) -> bool:
    """Whether the database has every migration this version of Taskman ships; when it
    lacks some, says which and what to run. When it cannot tell (the database is not up
    yet, the record is not readable to this role) the command starts as before."""
    try:
        pending = migrations.pending_migrations(conninfo)
    except psycopg.Error:
        return True
    if not pending:
        return True
    shipped = len(migrations.list_migrations())
    lacks = ("has none of Taskman's migrations" if len(pending) == shipped else
             f"lacks {len(pending)} of Taskman's {shipped} migrations, from "
             f"{pending[0].version}_{pending[0].name}")
    print(f"taskman {command}: the database {lacks}: run `taskman migrate` (or `supabase db "
          "push`) first", file=sys.stderr)
    return False


def cmd_edge(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from worker.edge.access_log import uvicorn_log_config
    from worker.edge.app import create_app

    conninfo = database_url(settings)
    if not migrated(conninfo, "edge"):
        return 2
    app = create_app(settings, conninfo)
    # Open /events streams would hold a graceful shutdown forever; give them a few seconds.
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5,
                log_config=uvicorn_log_config())
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from worker.logs import configure_logging
    from worker.polling.metrics import WorkerMetrics
    from worker.polling.service import serve_worker

    conninfo = database_url(settings)
    if not migrated(conninfo, "worker"):
        return 2
    configure_logging(args.log_format)
    metrics = WorkerMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, args.metrics_host, registry=metrics.registry)
    serve_worker(settings, conninfo, metrics)
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from worker.devtools.dev import run_dev
    from worker.logs import configure_logging

    configure_logging("text")
    conninfo = database_url(settings)
    for migration in migrations.migrate(conninfo):
        print(f"  applied migration {migration.version} {migration.name}")
    run_dev(settings, conninfo, args.host, args.port, args.demo)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.devtools.demo import REMOTE_PREFIX
    from worker.devtools.dev import create_demo_tasks

    created = create_demo_tasks(database_url(settings), args.edge_url.rstrip("/") + REMOTE_PREFIX)
    print(f"{created} demo tasks created; watch them at {args.edge_url}" if created
          else "demo tasks are already running")
    return 0


def _with_database(handler: Callable[[str, argparse.Namespace], int]) -> Callable[..., int]:
    """Adapt a task command to the CLI: resolve the database, print refusals."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        args.settings = settings  # for commands that apply settings (create: the network policy)
        try:
            return handler(database_url(settings), args)
        except CommandError as exc:
            print(f"taskman {args.command}: {exc}", file=sys.stderr)
            return exc.exit_code

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskman", description="Track long-running asynchronous jobs on Postgres."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser(
        "dev", help="database, migrations, worker and edge in one process, for trying Taskman")
    dev.add_argument("--host", default="127.0.0.1", help="listen address (%(default)s)")
    dev.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port (%(default)s)")
    dev.add_argument("--demo", action="store_true",
                     help="create sample tasks against a built-in simulated remote")
    dev.set_defaults(run=cmd_dev)

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.add_argument("--check", action="store_true",
                         help="list pending migrations, apply nothing; exit 1 if there are any")
    migrate.set_defaults(run=cmd_migrate)

    worker = commands.add_parser("worker", help="claim, poll and record tasks until SIGTERM")
    worker.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as plain text or one JSON object each (%(default)s)")
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics (polls, latencies) on this port")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for --metrics-port (%(default)s)")
    worker.set_defaults(run=cmd_worker)

    edge = commands.add_parser("edge", help="serve the HTTP API, callbacks and dashboard")
    edge.add_argument("--host", default="127.0.0.1", help="listen address (%(default)s)")
    edge.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port (%(default)s)")
    edge.set_defaults(run=cmd_edge)

    demo = commands.add_parser(
        "demo", help="create sample tasks against the simulated remote of a running `taskman dev`")
    demo.add_argument("--edge-url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                      help="where `taskman dev` listens (%(default)s)")
    demo.set_defaults(run=cmd_demo)

    add_task_commands(commands, _with_database)
    add_notification_commands(commands, _with_database)
    add_prune_command(commands, _with_database)
    add_hosts_command(commands, _with_database)
    add_realtime_command(commands, _with_database)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taskman`` script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        print(f"taskman: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        return args.run(settings, args)
    except ConfigurationError as exc:  # settings that validate alone but cannot work together
        print(f"taskman: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedColumn, psycopg.errors.InvalidSchemaName) as exc:
        print(f"taskman {args.command}: the database lacks Taskman's schema or some of its "
              f"migrations ({exc.sqlstate}: {exc.diag.message_primary}): run `taskman migrate` "
              "first", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        if exc.sqlstate is None:  # DATABASE_URL is wrong, the server is down or went away
            print(f"taskman {args.command}: cannot reach the database: {reason}",
                  file=sys.stderr)
        else:  # a timeout, a shutdown, too many connections
            print(f"taskman {args.command}: the database stopped it ({exc.sqlstate}: {reason})",
                  file=sys.stderr)
        return 2

