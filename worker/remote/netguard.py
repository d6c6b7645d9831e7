"""SSRF protection: refuse requests to loopback, private and other non-public addresses.

Two parts, both inside one aiohttp session (``guarded_session``):

- ``GuardedResolver`` is the session's resolver: aiohttp connects only to what it returns,
  so the addresses checked are the addresses connected to. A name is resolved once, every
  address it resolves to is checked, and one non-public address refuses the name. There is
  no second lookup between the check and the connection, so a DNS answer that changes in
  between (rebinding, TTL 0) cannot slip through. TLS (SNI, certificate) and the Host
  header still use the name, as aiohttp does for any resolver.
- ``check_url`` runs as a session middleware on every request, redirect hops included: plain
  http(s), no user info, and IP literals checked (aiohttp never resolves those). Its verdict
  is a function of the URL's scheme and authority, so the middleware remembers the ones
  that passed.

Sessions are built with ``trust_env=False``: a proxy from the environment would connect
in the guard's place.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import aiohttp
import certifi
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from worker.remote.allowed_hosts import AllowedHost

if TYPE_CHECKING:
    from worker.config import Settings

_PRIVATE_HINT = (
    "private networks are not allowed "
    "(operators can allow them with TASKMAN_ALLOWED_HOSTS or TASKMAN_ALLOW_PRIVATE_NETWORKS)"
)


class BlockedURL(Exception):
    """A URL the network policy refuses.

    ``str()`` is a neutral sentence safe to show to users; ``detail`` says more for the
    service's own records (``raw_error``), e.g. which address a name resolved to.
    Deliberately not an aiohttp.ClientError: a refusal is final, and must not be taken for
    a network error worth retrying. ``reason`` is a short code: ``non_public_address``,
    ``scheme``, ``credentials``, ``no_host`` or ``invalid_url``.
    """

    def __init__(self, message: str, detail: str | None = None, *,
                 reason: str = "non_public_address") -> None:
        super().__init__(message)
        self.detail = detail or message
        self.reason = reason


class InvalidHostName(Exception):
    """A host name no resolver can look up (an empty label, a label over 63 characters,
    ...); the message is safe to show to users."""


@dataclass(frozen=True)
class NetworkPolicy:
    """Which hosts polls and callbacks may reach.

    `allowed_hosts` are ``TASKMAN_ALLOWED_HOSTS`` entries (see AllowedHost): hosts reachable
    whatever they are or resolve to. An invalid entry raises ValueError naming it.
    """

    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    entries: tuple[AllowedHost, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = tuple(AllowedHost.parse(entry) for entry in sorted(self.allowed_hosts))
        object.__setattr__(self, "entries", entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> NetworkPolicy:
        """The policy of ``TASKMAN_ALLOW_PRIVATE_NETWORKS`` and ``TASKMAN_ALLOWED_HOSTS``."""
        return cls(settings.allow_private_networks, settings.allowed_hosts)

    def exempts(self, host: str, port: int | None = None) -> bool:
        """Whether `host` (at `port`) may be reached even if it is or resolves to a
        non-public address."""
        return self.allow_private or any(e.matches(host, port) for e in self.entries)


def is_blocked_address(ip: IPv4Address | IPv6Address) -> bool:
    """Whether `ip` is not a public unicast address (loopback, private, link-local, ...).

    IPv6 forms that embed an IPv4 address (IPv4-mapped, 6to4, Teredo) are judged by it too.
    """
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_blocked_address(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if ip.is_site_local or (embedded is not None and is_blocked_address(embedded)):
            return True
    return ip.is_multicast or ip.is_reserved or not ip.is_global


def check_url(url: str | URL, policy: NetworkPolicy) -> None:
    """Refuse, with BlockedURL, a URL that is not plain http(s) or names a blocked IP literal.

    Host names are not resolved here; GuardedResolver checks what they resolve to.
    """
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        host = parsed.raw_host
    except (ValueError, TypeError) as exc:
        raise BlockedURL(f"the URL is not valid: {exc}", reason="invalid_url") from None
    if parsed.scheme not in ("http", "https"):
        raise BlockedURL(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}",
                         reason="scheme")
    if not host:
        raise BlockedURL("the URL has no host", reason="no_host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise BlockedURL("URLs with a user name or password are not allowed; use poll_headers",
                         reason="credentials")
    ip = _ip_literal(host)
    if ip is not None and is_blocked_address(ip) and not policy.exempts(host, parsed.port):
        raise BlockedURL(f"{parsed.host} is a non-public address; {_PRIVATE_HINT}")


class GuardedResolver(AbstractResolver):
    """Resolves a name once and refuses it (BlockedURL) if any address is non-public.

    aiohttp connects only to the addresses a connector's resolver returns, so with this as
    the resolver the checked addresses are the ones connected to. Exempt hosts (the
    policy's) are resolved without the check. `inner` does the lookups (default: the
    system's, through getaddrinfo in a thread).
    """

    def __init__(self, policy: NetworkPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            answers = await self._inner.resolve(host, port, family)
        except UnicodeError:  # the idna codec: empty label, label too long, ...
            raise InvalidHostName(f"the URL's host name {host[:100]!r} is not valid") from None
        if not self.policy.exempts(host, port or None):
            for answer in answers:
                ip = ipaddress.ip_address(answer["host"])
                if is_blocked_address(ip):
                    raise BlockedURL(
                        f"{host} resolves to a non-public address; {_PRIVATE_HINT}",
                        detail=f"{host} resolves to {ip}, a non-public address",
                    )
        return answers

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(
    policy: NetworkPolicy,
    *,
    limit: int = 100,
    timeout: aiohttp.ClientTimeout | None = None,
    headers: Mapping[str, str] | None = None,
    resolver: AbstractResolver | None = None,
    **kwargs: Any,
) -> aiohttp.ClientSession:
    """An aiohttp session whose every connection and every request obeys `policy`.

    At most `limit` connections at a time; certificates verified against certifi's CAs (as
    httpx did); no proxy or .netrc from the environment; bodies are not decompressed by
    aiohttp (worker.remote.bodies does it within the size cap); no cookies kept (a
    session serves every user's tasks: a cookie one remote set would go with the next
    request to that host, whoever's task it is). `resolver` replaces the system's lookups
    (tests). Needs a running event loop.
    """
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, ssl=_tls_context(),
        resolver=GuardedResolver(policy, resolver),
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout or aiohttp.ClientTimeout(total=30),
        headers=headers, trust_env=False, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=(_policy_middleware(policy),), **kwargs,
    )


# Origins (scheme and authority) a session's middleware remembers as passing check_url.
_PASSED_ORIGINS = 4_096


def _policy_middleware(policy: NetworkPolicy) -> Callable[..., Any]:
    """check_url on every request. Its verdict depends only on the URL's scheme and
    authority (user info, host, port), so each that passed is remembered: IP literals
    are final, and names are checked by GuardedResolver on every lookup anyway."""
    passed: set[tuple[str, str]] = set()

    async def check_each_request(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        url = request.url
        origin = (url.scheme, url.raw_authority)
        if origin not in passed:
            check_url(url, policy)
            if len(passed) >= _PASSED_ORIGINS:
                passed.clear()
            passed.add(origin)
        return await handler(request)

    return check_each_request


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


def _ip_literal(host: str) -> IPv4Address | IPv6Address | None:
    """The address `host` denotes without DNS, or None if it is a name.

    Covers the legacy IPv4 forms resolvers accept (127.1, 0x7f.0.0.1, 2130706433).
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None
