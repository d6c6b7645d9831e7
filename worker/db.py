"""Database access: connections, named SQL queries, and PostgREST-style sessions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

API_ROLES = ("anon", "authenticated", "service_role")


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
    """Open a connection; ``application_name`` defaults to ``taskman``."""
    kwargs.setdefault("application_name", "taskman")
    return psycopg.connect(conninfo, **kwargs)


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
