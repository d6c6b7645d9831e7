"""A throwaway, migrated PostgreSQL for benchmarks, with production durability settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.pgcluster import Cluster, default_bin_dir
from worker.migrate import migrate

# Unlike the test cluster, benchmarks keep commits durable: figures should mean
# what they would mean on a real server.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@contextmanager
def migrated_databases(*names: str) -> Iterator[dict[str, str]]:
    """Start a cluster, create and migrate each database, yield their URLs."""
    cluster = Cluster(default_bin_dir(), DURABLE).start()
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
