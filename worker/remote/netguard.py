"""SSRF protection: refuse poll requests to loopback, private and other non-public addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import httpx

_PRIVATE_HINT = (
    "private networks are not allowed "
    "(operators can allow them with TASKMAN_ALLOWED_HOSTS or TASKMAN_ALLOW_PRIVATE_NETWORKS)"
)


class BlockedURL(Exception):
    """A URL the network policy refuses; the message is safe to show to users.

    Deliberately not an httpx.TransportError: a refusal is final, and must not be taken
    for a network error worth retrying.
    """


@dataclass(frozen=True)
class NetworkPolicy:
    """Which hosts polls may reach.

    `allowed_hosts` are host names or IP literals (IPv6 without brackets) reachable whatever
    they resolve to; they match exactly, ignoring case.
    """

    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", frozenset(h.lower() for h in self.allowed_hosts))

    def exempts(self, host: str) -> bool:
        """Whether `host` may be reached even if it is or resolves to a non-public address."""
        return self.allow_private or host.lower() in self.allowed_hosts


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


def check_url(url: str | httpx.URL, policy: NetworkPolicy) -> None:
    """Refuse, with BlockedURL, a URL that is not plain http(s) or names a blocked IP literal.

    Host names are not resolved here; GuardedTransport checks what they resolve to.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise BlockedURL(f"the URL is not valid: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise BlockedURL(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise BlockedURL("the URL has no host")
    if parsed.userinfo:
        raise BlockedURL("URLs with a user name or password are not allowed; use poll_headers")
    ip = _ip_literal(parsed.raw_host.decode("ascii"))
    if ip is not None and is_blocked_address(ip) and not policy.exempts(parsed.host):
        raise BlockedURL(f"{parsed.host} is a non-public address; {_PRIVATE_HINT}")


class GuardedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport that refuses requests to hosts resolving to non-public addresses.

    httpx sends every redirect hop through the transport, so redirects are checked too.
    Build the client with `trust_env=False`: proxies from the environment are mounted as
    transports of their own and would bypass this one. Needs an asyncio event loop.
    """

    def __init__(self, policy: NetworkPolicy, **kwargs: Any) -> None:
        """`kwargs` go to httpx.AsyncHTTPTransport (verify, limits, retries, ...)."""
        super().__init__(**kwargs)
        self.policy = policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        check_url(request.url, self.policy)
        if not self.policy.exempts(request.url.host):
            # Residual window: httpcore resolves the name again when it connects, so a DNS
            # server answering differently within milliseconds (TTL 0 rebinding) could still
            # slip through. Pinning the checked IP by rewriting the URL (plus sni_hostname)
            # is not done: httpcore would pool connections by IP, and HTTPS requests for two
            # names sharing an address (any CDN) would reuse one TLS session and its SNI.
            for ip in await _resolve(request):
                if is_blocked_address(ip):
                    raise BlockedURL(
                        f"{request.url.host} resolves to a non-public address ({ip}); "
                        f"{_PRIVATE_HINT}"
                    )
        return await super().handle_async_request(request)


async def _resolve(request: httpx.Request) -> list[IPv4Address | IPv6Address]:
    """Every address the request's host resolves to, within the connect timeout."""
    host = request.url.raw_host.decode("ascii")
    timeout = request.extensions.get("timeout", {}).get("connect")
    try:
        async with asyncio.timeout(timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        raise httpx.ConnectTimeout(f"resolving {host} timed out", request=request) from None
    except socket.gaierror as exc:
        raise httpx.ConnectError(
            f"cannot resolve {host}: {exc.strerror}", request=request
        ) from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


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
