"""A Supabase project's JWT signing keys, read from its JWKS, cached, refreshed sparingly.

Supabase Auth publishes the public half of the project's signing keys at
``<SUPABASE_URL>/auth/v1/.well-known/jwks.json``. Keys are parsed with PyJWT's
``PyJWK``; this module only decides when to fetch:

- a fetched key set is used for ``max_age`` seconds, then fetched again on the next
  request; until a fetch succeeds, the keys already held stay in use, so an outage of
  Auth does not sign anyone out;
- a ``kid`` the set does not hold triggers a refresh, since the owner may have just
  published a key;
- whatever the reason, at most one fetch starts per ``refresh_interval`` seconds, so
  tokens with forged ``kid`` values cannot make the edge hammer Auth; concurrent
  requests wait for the fetch under way instead of starting their own;
- a fetch is bounded: ``timeout`` seconds in all and ``MAX_JWKS_BYTES``, no redirects.

Fetching blocks (it is plain synchronous HTTP): call ``key`` from a worker thread, never
from the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping

import httpx
from jwt import PyJWK, PyJWTError

log = logging.getLogger(__name__)

JWKS_PATH = "/auth/v1/.well-known/jwks.json"
# Supabase Auth signs with ES256 (the default) or RS256; nothing else is accepted.
ACCEPTED_ALGORITHMS = frozenset({"ES256", "RS256"})
# A JWKS holds a handful of public keys: a few KiB.
MAX_JWKS_BYTES = 256 * 1024


def jwks_url(supabase_url: str) -> str:
    """The JWKS address of the project at ``supabase_url``."""
    return supabase_url.rstrip("/") + JWKS_PATH


def auth_issuer(supabase_url: str) -> str:
    """The ``iss`` Supabase Auth puts in the tokens of the project at ``supabase_url``."""
    return supabase_url.rstrip("/") + "/auth/v1"


class UnknownSigningKey(Exception):
    """The JWKS, freshly fetched, has no key with this ``kid``."""


class SigningKeysUnavailable(Exception):
    """The JWKS could not be fetched, and no key already held has this ``kid``."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _FetchFailed(Exception):
    pass


class SigningKeys:
    """The verification keys of one JWKS endpoint, by ``kid``; safe to share between threads."""

    def __init__(self, url: str, *, timeout: float = 5.0, refresh_interval: float = 30.0,
                 max_age: float = 600.0) -> None:
        self.url = url
        self._timeout = timeout
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._keys: Mapping[str, PyJWK] = {}  # replaced whole, never mutated: read without lock
        self._fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._attempted_at: float | None = None  # ... and of the last attempt, successful or not
        self._failure: str | None = None  # why the last attempt failed; None if it succeeded
        self._lock = threading.Lock()  # held by the one thread that fetches

    def key(self, kid: str) -> PyJWK:
        """The key named ``kid``, fetching the JWKS when needed and allowed.

        Raises UnknownSigningKey when the JWKS has no such key, SigningKeysUnavailable
        when it could not be fetched and no key held fits.
        """
        held = self._keys.get(kid)
        if held is not None and not self._is_stale():
            return held
        if held is not None:
            # Stale: one thread refreshes, the others go on with the key they hold.
            if not self._lock.acquire(blocking=False):
                return held
        else:
            # Unknown: wait for a fetch under way, which may bring it.
            self._lock.acquire()
        try:
            if kid not in self._keys or self._is_stale():
                self._refresh()
        finally:
            self._lock.release()
        found = self._keys.get(kid)
        if found is not None:
            return found
        if self._failure is not None:
            raise SigningKeysUnavailable(self._failure, self._next_attempt_in())
        raise UnknownSigningKey(kid)

    def _is_stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self._max_age

    def _next_attempt_in(self) -> float:
        if self._attempted_at is None:
            return 0.0
        return max(0.0, self._attempted_at + self._refresh_interval - time.monotonic())

    def _refresh(self) -> None:
        """Fetch the JWKS, unless an attempt was made less than ``refresh_interval`` ago.
        Call with the lock held."""
        if self._next_attempt_in() > 0:
            return
        self._attempted_at = time.monotonic()
        try:
            keys = self._fetch()
        except _FetchFailed as exc:
            self._failure = str(exc)
            log.warning("cannot fetch the JWKS at %s: %s; %d keys kept in use", self.url, exc,
                        len(self._keys))
            return
        self._keys = keys
        self._fetched_at = self._attempted_at
        self._failure = None
        log.info("fetched the JWKS at %s: %d signing keys", self.url, len(keys))

    def _fetch(self) -> dict[str, PyJWK]:
        deadline = time.monotonic() + self._timeout
        body = bytearray()
        try:
            # trust_env: an egress proxy set in the environment (HTTPS_PROXY) is used.
            with httpx.Client(timeout=self._timeout, follow_redirects=False) as client, \
                    client.stream("GET", self.url, headers={"Accept": "application/json"}) as r:
                if r.status_code != 200:
                    raise _FetchFailed(f"HTTP {r.status_code}")
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _FetchFailed(f"the answer is larger than {MAX_JWKS_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _FetchFailed(f"no complete answer in {self._timeout:g} s")
        except httpx.TimeoutException:
            raise _FetchFailed(f"no answer in {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _FetchFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise _FetchFailed("the answer is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _FetchFailed('the answer is not a JWKS (no "keys" list)')
        return _signing_keys(document["keys"])


def _signing_keys(entries: list[object]) -> dict[str, PyJWK]:
    """The usable ES256 and RS256 signature keys among ``entries``, by ``kid``.

    An entry PyJWT cannot read, without ``kid``, meant for encryption, or of another
    algorithm (a symmetric ``oct`` key above all) is left out: a JWKS may hold keys for
    other purposes, and none of them may verify a token here.
    """
    keys: dict[str, PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(entry)
        except PyJWTError as exc:
            log.warning("JWKS key %r left out: %s", kid, exc)
            continue
        if key.algorithm_name in ACCEPTED_ALGORITHMS:
            keys[kid] = key
    return keys
