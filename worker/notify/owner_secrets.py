"""Owners' own callback signing secrets, as a worker keeps them.

``taskman.rotate_callback_secret`` stores an owner's secret (and, for a grace, the one it
replaced) in ``taskman_private.callback_secrets``. The worker keeps every owner's in
memory, so signing a callback costs a dictionary look-up: it looks for rotations at most
every ``REFRESH_SECONDS`` while callbacks go out (one indexed query that reads nothing
when nothing changed, on a connection of its own), and reads them all again every
``FULL_RELOAD_SECONDS`` (a secret removed by hand is forgotten then). A rotation is in
use within ``REFRESH_SECONDS``; an idle worker asks nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from worker import store

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
FULL_RELOAD_SECONDS = 300.0
# Rotations are read again for this long after the look that saw them: one committed
# after a look began (with a timestamp before it) is not missed.
OVERLAP = timedelta(seconds=60)
# A look that fails is tried again after this long; meanwhile secrets read up to
# MAX_STALE_SECONDS ago are used, and past that callbacks wait (SecretsUnavailable).
RETRY_SECONDS = 1.0
MAX_STALE_SECONDS = 60.0
QUERY_TIMEOUT_SECONDS = 5.0
SECRET_PREFIX = "whsec_"


class SecretsUnavailable(Exception):
    """Owners' secrets could not be read lately: a callback cannot be signed rightly."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: a ``whsec_<base64>`` secret's decoded bytes (Standard
    Webhooks), any other string's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"a {SECRET_PREFIX} secret must be base64 after its prefix") from exc
    return secret.encode()


def keyed(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 state keyed with ``secret``, to be copied for each message."""
    return hmac.new(signing_key(secret), digestmod=hashlib.sha256)


@dataclass(frozen=True)
class _OwnerKeys:
    current: hmac.HMAC
    previous: hmac.HMAC | None
    previous_until: float  # Unix seconds; 0 without a previous secret

    def keys(self, now: float) -> tuple[hmac.HMAC, ...]:
        if self.previous is not None and now < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)


def _owner_keys(row: dict[str, Any]) -> _OwnerKeys:
    previous = row["previous_secret"]
    until = row["previous_valid_until"]
    return _OwnerKeys(keyed(row["secret"]), keyed(previous) if previous else None,
                      until.timestamp() if until is not None else 0.0)


class OwnerSecrets:
    """Every owner's signing keys, refreshed from the database as callbacks go out.

    ``conninfo`` is the worker's database; the cache holds one connection of its own
    while it is in use (``aclose`` ends it). Safe for many concurrent senders: one look
    at a time, which the others wait for."""

    def __init__(self, conninfo: str, *, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self._conninfo = conninfo
        self._refresh_seconds = refresh_seconds
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._keys: dict[str, _OwnerKeys] = {}
        self._since: datetime | None = None
        self._loaded_at = -float("inf")  # monotonic time of the last look that worked
        self._full_at = -float("inf")  # ... and of the last that read everything
        self._failed_at = -float("inf")
        self._look: asyncio.Task[None] | None = None

    async def keys(self, user_id: str) -> tuple[hmac.HMAC, ...] | None:
        """The keyed HMACs ``user_id``'s callbacks are signed with, current first; None if
        the owner has no secret of their own. Raises SecretsUnavailable when the secrets
        could not be read for MAX_STALE_SECONDS."""
        await self._fresh()
        owner = self._keys.get(user_id)
        return None if owner is None else owner.keys(time.time())

    async def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._loaded_at < self._refresh_seconds:
            return
        if now - self._failed_at >= RETRY_SECONDS and (self._look is None or self._look.done()):
            self._look = asyncio.create_task(self._refresh(), name="owner_secrets")
        if self._look is not None and not self._look.done():
            try:
                await asyncio.shield(self._look)
                return
            except (psycopg.Error, OSError, TimeoutError):
                pass  # logged by _refresh
        if time.monotonic() - self._loaded_at > MAX_STALE_SECONDS:
            raise SecretsUnavailable("owners' callback signing secrets could not be read")

    async def _refresh(self) -> None:
        full = time.monotonic() - self._full_at >= FULL_RELOAD_SECONDS
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_SECONDS):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, prepare_threshold=None,
                        application_name="taskman-worker")
                read_at, rows = await store.callback_secrets_since(
                    self._conn, None if full else self._since)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._failed_at = time.monotonic()
            await self.aclose()
            log.warning("reading owners' callback secrets failed (%s); retrying in %.0fs",
                        exc, RETRY_SECONDS)
            raise
        changed = {}
        for row in rows:
            try:
                changed[str(row["user_id"])] = _owner_keys(row)
            except ValueError as exc:  # a hand-edited row: the shared secret signs meanwhile
                log.error("owner %s's callback secret is unusable: %s", row["user_id"], exc)
        if full:
            self._keys = changed
            self._full_at = time.monotonic()
        else:
            self._keys.update(changed)
        self._since = read_at - OVERLAP
        self._loaded_at = time.monotonic()

    async def aclose(self) -> None:
        """Close the cache's connection (it reconnects if used again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
