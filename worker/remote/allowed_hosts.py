"""``TASKMAN_ALLOWED_HOSTS`` entries: which hosts the network policy lets through.

Plain standard library, so that settings can check entries when they are read.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _normal_host(host: str) -> str:
    """`host` as entries and URLs are compared: lower case, without a trailing dot, an
    IPv6 literal in its compressed form."""
    host = host.strip().lower().rstrip(".")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    return host


@dataclass(frozen=True)
class AllowedHost:
    """One ``TASKMAN_ALLOWED_HOSTS`` entry: ``host``, ``host:port`` or ``*.suffix[:port]``.

    A plain entry matches the URL's host name exactly (ignoring case and a trailing dot);
    ``*.example.com`` matches names ending in ``.example.com`` (not ``example.com`` itself,
    never an IP literal); an IPv6 literal is written bare (``::1``, any port) or in
    brackets (``[::1]:8080``). With a port, only that port (the URL's, or 80/443 by
    default) matches. Nothing is resolved: names are compared as written.
    """

    host: str
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, entry: str) -> AllowedHost:
        """Read one entry; ValueError names what is wrong with it."""
        text = entry.strip().lower()
        problem = f"TASKMAN_ALLOWED_HOSTS entry {entry!r}"
        if "/" in text or "@" in text:
            raise ValueError(f"{problem}: give a host name, host:port or *.suffix, not a URL")
        host, port = text, None
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{problem}: an IPv6 literal is written [address] or "
                                 "[address]:port")
            port = _port(rest[1:], problem) if rest else None
            if not _is_ip(host):
                raise ValueError(f"{problem}: {host!r} is not an IPv6 address")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = _port(port_text, problem)
        wildcard = host.startswith("*.")
        name = _normal_host(host[2:] if wildcard else host)
        if not _is_ip(name) and not (_HOST_NAME.fullmatch(name) and len(name) <= 253):
            raise ValueError(f"{problem}: not a host name (ASCII letters, digits, '-', '_'; "
                             "write international names in their xn-- form), an IP literal "
                             "or *.suffix")
        if wildcard and _is_ip(name):
            raise ValueError(f"{problem}: *.suffix takes a domain name, not an address")
        return cls(name, port, wildcard)

    def matches(self, host: str, port: int | None) -> bool:
        """Whether a URL's `host` (as in the URL, without brackets) and `port` match."""
        if self.port is not None and port != self.port:
            return False
        name = _normal_host(host)
        if self.wildcard:
            return not _is_ip(name) and name.endswith("." + self.host)
        return name == self.host


def _port(text: str, problem: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{problem}: the port must be a number from 1 to 65535")
    return int(text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_allowed_hosts(entries: frozenset[str]) -> frozenset[str]:
    """`entries` unchanged if every one parses; ValueError naming the first that does not."""
    for entry in sorted(entries):
        AllowedHost.parse(entry)
    return entries
