"""The ``taskman`` command line."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from worker import migrate as migrations
from worker.config import Settings


def database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded default when it is unset."""
    if settings.database_url:
        return settings.database_url
    from worker.embedded import embedded_database_url

    return embedded_database_url()


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = migrations.migrate(database_url(settings))
    if applied:
        for migration in applied:
            print(f"applied {migration.version} {migration.name}")
    else:
        print("database is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskman", description="Track long-running asynchronous jobs on Postgres."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(
        run=cmd_migrate
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taskman`` script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"taskman: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    return args.run(settings, args)


if __name__ == "__main__":
    sys.exit(main())
