"""The benchmarks' database: a throwaway, migrated PostgreSQL with production durability
settings, their named queries (bench/queries.sql), and bulk-loaded tasks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import psycopg

from worker.db import parse_named_queries
from worker.devtools.pgcluster import Cluster, default_bin_dir
from worker.migrate import migrate

# Unlike the test cluster, benchmarks keep commits durable: figures should mean
# what they would mean on a real server.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@contextmanager
def migrated_databases(*names: str,
                       settings: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Start a cluster (``settings`` beside the durable ones), create and migrate each
    database, yield their URLs."""
    cluster = Cluster(default_bin_dir(), {**DURABLE, **(settings or {})}).start()
    try:
        urls = {}
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            for name in names:
                conn.execute(f"create database {name}")
        for name in names:
            urls[name] = cluster.url(name)
            migrate(urls[name])
        yield urls
    finally:
        cluster.stop()


@cache
def queries() -> dict[str, str]:
    """The named queries of bench/queries.sql."""
    return parse_named_queries((Path(__file__).parent / "queries.sql").read_text(encoding="utf-8"))


def wait_for_completion(conn: psycopg.Connection, count: int) -> None:
    """Wait until no task is live any more, looking every 20 ms, then check that `count`
    completed. The look is one index probe: counting the finished rows every 20 ms would
    itself take a growing share of the cores the measured worker runs on."""
    q = queries()
    while conn.execute(q["live_tasks_remain"]).fetchone()[0]:
        time.sleep(0.02)
    completed = conn.execute(q["count_completed"]).fetchone()[0]
    if completed < count:
        raise RuntimeError(f"only {completed} of {count} tasks completed")


def fill_tasks(url: str, *, terminal: int = 0, due: int = 0, future: int = 0) -> None:
    """Bulk-load tasks (triggers off): finished, due now, and due in an hour."""
    q = queries()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(q["triggers_off"])
        conn.execute(q["fill_tasks"], {"terminal": terminal, "due": due, "future": future})
        conn.execute(q["fill_schedule"])
        conn.execute(q["analyze_tasks"])
        conn.execute(q["analyze_schedule"])
