"""The circuit breakers and Retry-After pauses of remote hosts (``taskman_private.hosts``,
see ``worker.polling.hosts``) applied to completion callbacks, for the callback stream.

A callback whose receiver host has an open circuit or is paused, for everyone or for
the owner of its task, is not sent: claims skip a host closed for everyone
(``claim_outbox``'s ``skip_hosts``, from a host list read at most every
``REFRESH_SECONDS``), and a claimed row of such a host or owner is given back
(``hold_callbacks``: due, same delivery id, no attempt spent), except the one that goes
as the probe when it is due. Callback outcomes count toward their owner's circuit on the
receiver host like poll outcomes (``record_host_outcomes``, one statement a batch); a
failed probe is given back, not recorded. When the circuit closes, the held callbacks are
claimed again.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from worker import store
from worker.config import Settings
from worker.notify.delivery import Delivery
from worker.polling.hosts import HostGate, host_verdict, owner_key
from worker.remote.host_keys import host_key

# How stale the list of open and paused hosts may be.
REFRESH_SECONDS = 0.5
# How claim_outbox keys a callback's host for skip_hosts: the URL's authority, as written.
_AUTHORITY = re.compile(r"^[^:/?#]+://([^/?#]*)")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def callback_host(url: object) -> str:
    """The authority of a callback URL, exactly as claim_outbox's ``skip_hosts`` reads it."""
    match = _AUTHORITY.match(url) if isinstance(url, str) else None
    return match.group(1) if match else ""


def _authorities(key: str) -> set[str]:
    """The usual ways a URL spells the host key ``scheme://host:port``: with its port,
    and without it when it is the scheme's default."""
    scheme, _, authority = key.partition("://")
    host, _, port = authority.rpartition(":")
    spelled = {authority}
    if _DEFAULT_PORTS.get(scheme) == port:
        spelled.add(host)
    return spelled


class CallbackHosts:
    """One worker's view of its callbacks' receiver hosts."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self._settings = settings
        self._worker_id = worker_id
        self._gate = HostGate(settings, worker_id)
        # Host key, or host key#owner for an owner's own circuit -> closed to claims (no
        # probe due).
        self._states: dict[str, bool] = {}
        self._spellings: dict[str, set[str]] = {}  # authorities seen in rows held back
        self._checked_at = -math.inf
        self._probes: set[int] = set()  # outbox ids sent to an open or paused host

    async def skip_hosts(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """The authorities (as claim_outbox reads them) of hosts with an open circuit and
        no probe due, or paused."""
        if time.monotonic() - self._checked_at >= REFRESH_SECONDS:
            self._states = await store.callback_host_states(conn)
            self._checked_at = time.monotonic()
            self._spellings = {k: v for k, v in self._spellings.items() if k in self._states}
        return sorted({spelled for key, closed in self._states.items()
                       if closed and "#" not in key
                       for spelled in _authorities(key) | self._spellings.get(key, set())})

    async def hold(self, conn: psycopg.AsyncConnection[Any],
                   callbacks: Sequence[tuple[int, str | None, str | None]]) -> set[int]:
        """Of claimed ``(outbox_id, callback_url, owner)`` callbacks, the ids their hosts
        or owners' circuits hold back (given back to the outbox); the others may be sent,
        one of them perhaps as a probe."""
        if not self._states:  # nearly always: no host or owner restricts anything
            return set()
        watched = [(outbox_id, key, url, keys) for outbox_id, url, owner in callbacks
                   if (key := host_key(url)) is not None
                   and (keys := self._watched_keys(key, owner))]
        if not watched:
            return set()
        held = await store.hold_callbacks(
            conn, self._worker_id, [(i, k) for i, _, _, keys in watched for k in keys],
            cooldown_seconds=self._settings.host_cooldown_seconds,
            max_cooldown_seconds=self._settings.host_max_cooldown_seconds)
        for outbox_id, key, url, _ in watched:
            if outbox_id in held:
                self._spellings.setdefault(key, set()).add(callback_host(url))
            else:
                self._probes.add(outbox_id)
        self._checked_at = -math.inf  # a probe was taken, or a host has changed: look again
        return held

    def _watched_keys(self, key: str, owner: str | None) -> list[str]:
        """The circuits known to restrict a callback to `key` for `owner`: the owner's
        own, then the host's."""
        return [k for k in (owner_key(key, owner), key) if k in self._states]

    async def report(self, conn: psycopg.AsyncConnection[Any],
                     finished: Sequence[tuple[int, str | None, str | None, Delivery]]
                     ) -> set[int]:
        """Record what finished ``(outbox_id, callback_url, owner, delivery)`` callbacks
        say about their hosts; returns the ids of failed probes given back to the outbox
        instead (not to be recorded: they spend no attempt)."""
        keys = [host_key(url) for _, url, _, _ in finished]
        outcomes = [{"host": key, "owner": owner, "http_status": d.http_status,
                     "reason": d.reason, "retry_after_seconds": d.retry_after_seconds}
                    for key, (_, _, owner, d) in zip(keys, finished, strict=True)]
        await self._gate.report(conn, outcomes)
        failed = [(i, key, owner)
                  for key, (i, _, owner, _), o in zip(keys, finished, outcomes, strict=True)
                  if host_verdict(o) == "failure"]
        probes = [(i, k) for i, key, owner in failed if i in self._probes and key is not None
                  for k in (owner_key(key, owner), key)]
        self._probes.difference_update(i for i, _, _, _ in finished)
        if failed:
            self._checked_at = -math.inf  # a circuit may have opened
        if not probes:
            return set()
        return await store.hold_callbacks(
            conn, self._worker_id, probes,
            cooldown_seconds=self._settings.host_cooldown_seconds,
            max_cooldown_seconds=self._settings.host_max_cooldown_seconds, take_probes=False)


def callback_owner(payload: Mapping[str, Any] | None) -> str | None:
    """The owner of a callback's task (its ``user_id``; None: the service's own)."""
    owner = payload.get("user_id") if payload is not None else None
    return owner if isinstance(owner, str) else None
