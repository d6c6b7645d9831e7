"""Refusing, when a task is created, a URL the network policy would refuse when it is used.

The worker checks every poll and callback against its network policy (worker.remote.
netguard); a URL it refuses fails the poll, or gives up the callback, long after the
task was accepted. The edge and ``taskman create`` run ``check_task_urls`` with the
policy they are configured with and refuse such a task at once, naming the field and
the setting that would allow the host. A name is resolved (once, with a short timeout)
as the worker would resolve it; a name that does not resolve now passes, since DNS may
be ready by the time the worker uses it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address

from yarl import URL

from worker.remote.netguard import BlockedURL, NetworkPolicy, check_url, is_blocked_address

# The task fields holding URLs the worker will request, checked by check_task_urls.
TASK_URL_FIELDS = ("poll_url", "submit_url", "callback_url")
LOOKUP_TIMEOUT_SECONDS = 2.0

Lookup = Callable[[str, int | None], list[str]]
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="taskman-url-check")


class RefusedURL(ValueError):
    """A task URL the network policy refuses; ``str()`` names the field and what would
    allow it, and is safe to show to whoever created the task (no resolved address)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def task_urls(task: object) -> dict[str, str | None]:
    """The URL fields of a task to create (any object with those attributes)."""
    return {name: getattr(task, name, None) for name in TASK_URL_FIELDS}


def check_task_urls(urls: Mapping[str, str | None], policy: NetworkPolicy,
                    lookup: Lookup | None = None) -> None:
    """Raise RefusedURL for the first of `urls` (field name to URL; None is skipped) that
    `policy` would refuse: not http(s), credentials in it, or a host that is or resolves
    to a non-public address and is not allowed. `lookup` resolves a name to addresses
    (default: the system's, at most LOOKUP_TIMEOUT_SECONDS; none if it fails)."""
    for field, url in urls.items():
        if url:
            _check(field, url, policy, lookup or system_lookup)


def system_lookup(host: str, port: int | None) -> list[str]:
    """The addresses `host` resolves to now, or [] if it does not resolve in time."""
    future = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        answers = future.result(LOOKUP_TIMEOUT_SECONDS)
    except (OSError, UnicodeError, TimeoutError):
        return []
    return [str(answer[4][0]) for answer in answers]


def _check(field: str, url: str, policy: NetworkPolicy, lookup: Lookup) -> None:
    try:
        check_url(url, policy)
    except BlockedURL as exc:
        if exc.reason != "non_public_address":
            raise RefusedURL(field, f"{field}: {exc}") from None
        raise RefusedURL(field, _allow_hint(field, URL(url), "is")) from None
    parsed = URL(url)
    host = parsed.raw_host or ""
    if policy.exempts(host, parsed.port) or _is_ip(host):
        return  # IP literals were judged by check_url
    for address in lookup(host, parsed.port):
        if is_blocked_address(ip_address(address.split("%")[0])):
            raise RefusedURL(field, _allow_hint(field, parsed, "resolves to"))


def _allow_hint(field: str, url: URL, verb: str) -> str:
    host = url.raw_host or ""
    return (f"{field}: {host} {verb} a non-public address, which Taskman's network policy "
            f"refuses; to allow it, add {host} (or {_authority(url)}) to TASKMAN_ALLOWED_HOSTS, "
            "or set TASKMAN_ALLOW_PRIVATE_NETWORKS=true, for the worker and here")


def _authority(url: URL) -> str:
    host = url.raw_host or ""
    return f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True
