"""Database access: connections, named SQL queries, and PostgREST-style sessions."""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from worker.remote import backoff

API_ROLES = ("anon", "authenticated", "service_role")

PoolMode = Literal["session", "transaction"]
# Supabase's transaction pooler (Supavisor, hosted and self-hosted) listens on this port;
# its session pooler and the direct connection on 5432.
TRANSACTION_POOLER_PORT = 6543


# After a failed or refused database call: wait 0.1 s plus a full-jitter backoff from
# 0.2 s, at most 5 s.
_RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS = 0.2, 5.0


def retry_delay(failures: int) -> float:
    """Seconds to wait before retrying a database call after its `failures`-th
    consecutive failure (1 or more)."""
    return _RETRY_BASE_SECONDS / 2 + backoff.retry_delay(
        failures, _RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS, random.random())


# After a write refused as read-only, a pool's connections are replaced at most this often.
READ_ONLY_RENEWAL_SECONDS = 5.0


class ReadOnlyRenewal:
    """When to replace a pool's connections after the database refused a write as
    read-only (a full disk on Supabase, ``alter database … set
    default_transaction_read_only``). A database-level default reaches only sessions that
    begin after it changes, so only new connections see writes allowed again. At most once
    every READ_ONLY_RENEWAL_SECONDS: a database still read-only is not flooded with new
    connections."""

    def __init__(self) -> None:
        self._renewed_at = -math.inf

    def due(self) -> bool:
        """Whether to replace them now (then not again for a while)."""
        now = time.monotonic()
        if now - self._renewed_at < READ_ONLY_RENEWAL_SECONDS:
            return False
        self._renewed_at = now
        return True


def parse_named_queries(text: str) -> dict[str, str]:
    """The ``-- name: <name>`` blocks of a SQL file, by name."""
    blocks = re.split(r"^-- name: *(\w+) *$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(blocks[1::2], blocks[2::2], strict=True)}


@cache
def queries() -> dict[str, str]:
    """The named queries of ``worker/queries.sql``."""
    return parse_named_queries(
        resources.files("worker").joinpath("queries.sql").read_text(encoding="utf-8"))


def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection:
    """Open a short-lived connection (the CLI, migrations); ``application_name`` defaults
    to ``taskman``.

    It prepares no statements: a few statements gain nothing from them, and without
    them the connection works behind any pooler, transaction poolers included.
    """
    kwargs.setdefault("application_name", "taskman")
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(conninfo, **kwargs)


class ConfigurationError(ValueError):
    """A setting that cannot work; the message names it and says what to use instead."""


def detect_pool_mode(conninfo: str, setting: str = "DATABASE_URL") -> PoolMode:
    """``transaction`` when ``conninfo`` is a transaction pooler, as far as its URL tells.

    That is Supabase's: port 6543 (``<region>.pooler.supabase.com:6543``, or a
    self-hosted Supavisor). Anything else (a direct connection, the session pooler on
    5432, a local server) keeps a session. ``setting`` names the URL in errors.
    """
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"{setting} is not a PostgreSQL URL or connection string: {exc}") from None
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    return ("transaction" if any(p.strip() == str(TRANSACTION_POOLER_PORT) for p in ports)
            else "session")


@dataclass(frozen=True)
class Connections:
    """How a long-running part (the worker, the edge) reaches the database.

    ``pool_mode`` is what a connection to ``conninfo`` keeps between transactions:
    ``session`` (a direct connection, a session pooler) or ``transaction`` (a
    transaction pooler: no prepared statements, no session state, no LISTEN).
    ``listen_conninfo`` is where LISTEN works, or None when changes must be polled.
    """

    conninfo: str
    pool_mode: PoolMode
    listen_conninfo: str | None

    @classmethod
    def resolve(cls, conninfo: str, pool_mode: str = "auto",
                listen_conninfo: str | None = None) -> Connections:
        """From ``DATABASE_URL``, ``TASKMAN_DATABASE_POOL_MODE`` (``auto`` detects it from
        the URL) and ``TASKMAN_LISTEN_DATABASE_URL``."""
        mode: PoolMode
        if pool_mode == "auto":
            mode = detect_pool_mode(conninfo)
        elif pool_mode == "session":
            mode = "session"
        elif pool_mode == "transaction":
            mode = "transaction"
        else:
            raise ConfigurationError(
                f"TASKMAN_DATABASE_POOL_MODE must be auto, session or transaction, "
                f"not {pool_mode!r}")
        if listen_conninfo and detect_pool_mode(
                listen_conninfo, "TASKMAN_LISTEN_DATABASE_URL") == "transaction":
            raise ConfigurationError(
                "TASKMAN_LISTEN_DATABASE_URL must keep a session, for LISTEN: give the "
                "direct connection (db.<project>.supabase.co:5432) or the session pooler "
                f"(port 5432), not the transaction pooler (port {TRANSACTION_POOLER_PORT})")
        listen = listen_conninfo or (conninfo if mode == "session" else None)
        return cls(conninfo, mode, listen)

    @property
    def connection_kwargs(self) -> dict[str, Any]:
        """Options for long-lived connections to ``conninfo``: behind a transaction pooler,
        no prepared statements (the next transaction may run on another server
        connection, where they do not exist); elsewhere psycopg's default (prepare a
        statement from its fifth use)."""
        return {"prepare_threshold": None} if self.pool_mode == "transaction" else {}


def json_arg(value: Any) -> Jsonb | None:
    """A JSON query argument; None stays SQL NULL ("not given"), not JSON null."""
    return None if value is None else Jsonb(value)


@contextmanager
def api_session(
    conn: psycopg.Connection, role: str, claims: Mapping[str, Any] | None = None
) -> Iterator[psycopg.Cursor]:
    """Run statements as PostgREST would for ``role`` and JWT ``claims``.

    One transaction with ``SET LOCAL ROLE`` and ``request.jwt.claims`` set locally,
    so row-level security and ``auth.uid()`` decide exactly as under PostgREST.
    """
    if role not in API_ROLES:
        raise ValueError(f"role must be one of {', '.join(API_ROLES)}, not {role!r}")
    full_claims = {"role": role, **(claims or {})}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        cur.execute(
            "select set_config('request.jwt.claims', %s, true)", (json.dumps(full_claims),)
        )
        yield cur
