"""Host keys (scheme + host + port) and the ``TASKMAN_HOST_RATE_LIMITS`` setting.

The key is what ``taskman_private.host_key`` derives in SQL, with the same pattern:
lower-case scheme and host, IPv6 in brackets, user info dropped, and the port (the
scheme's default when absent): ``https://api.example.com:443``.
"""

from __future__ import annotations

import re

# Keep in step with taskman_private.host_key (supabase/migrations/*_remote_hosts.sql).
_URL = re.compile(
    r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]{0,9}))?(?:[/?#]|$)")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*([sm]))?\s*$")


def host_key(url: str | None) -> str | None:
    """The host key of ``url``, or None when it is not an absolute URL with a host."""
    match = _URL.match(url) if isinstance(url, str) else None
    if match is None or not match.group(2):
        return None
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
    port = str(int(port)) if port else _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def parse_rate_limits(text: str) -> dict[str, float]:
    """``api.example.com=5/s, http://10.0.0.7:8080=300/m`` as host key -> requests per
    second. A host without a scheme is https; without a port, the scheme's default.
    A rate is ``N/s`` (or just ``N``) or ``N/m``."""
    limits: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        host, sep, rate_text = entry.rpartition("=")
        rate = _RATE.match(rate_text)
        key = host_key(host.strip() if "://" in host else f"https://{host.strip()}")
        if not sep or key is None or rate is None:
            raise ValueError(f"{entry!r}: each entry must be host=rate, like api.example.com=5/s")
        per_second = float(rate.group(1)) / (60 if rate.group(2) == "m" else 1)
        if not 0 < per_second <= 1_000_000:
            raise ValueError(f"{entry!r}: the rate must be above 0 and at most 1000000/s")
        limits[key] = per_second
    return limits
