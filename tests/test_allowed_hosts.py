"""TASKMAN_ALLOWED_HOSTS entries (host, host:port, *.suffix) and the check of a new task's
URLs against the network policy: attempts to slip past them. No database needed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.config import Settings
from worker.remote.allowed_hosts import AllowedHost
from worker.remote.netguard import BlockedURL, NetworkPolicy, check_url
from worker.remote.url_policy import RefusedURL, check_task_urls


def allows(entries: str, host: str, port: int | None = None) -> bool:
    settings = Settings(_env_file=None, TASKMAN_ALLOWED_HOSTS=entries)
    return NetworkPolicy.from_settings(settings).exempts(host, port)


@pytest.mark.parametrize(("entries", "host", "port", "allowed"), [
    # exact names, case and trailing dots
    ("status.internal", "status.internal", 443, True),
    ("status.internal", "STATUS.Internal", 80, True),
    ("status.internal", "status.internal.", 80, True),
    ("Status.Internal.", "status.internal", 80, True),
    ("status.internal", "status.internal.evil.com", 80, False),
    ("status.internal", "evilstatus.internal", 80, False),
    ("status.internal", "a.status.internal", 80, False),
    # no DNS: an address does not cover the names that resolve to it, nor the reverse
    ("127.0.0.1", "localhost", 80, False),
    ("localhost", "127.0.0.1", 80, False),
    ("127.0.0.1", "127.1", 80, False),
    ("127.0.0.1", "127.0.0.1", 5678, True),
    # wildcards: subdomains only, never the suffix itself or a look-alike
    ("*.example.com", "a.example.com", 443, True),
    ("*.example.com", "a.b.example.com", 443, True),
    ("*.example.com", "A.EXAMPLE.COM.", 443, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "evil-example.com", 443, False),
    ("*.example.com", "example.com.evil.net", 443, False),
    ("*.example.com", "aexample.com", 443, False),
    ("*.0.1", "10.0.0.1", 80, False),  # a wildcard never matches an IP literal
    # ports: an entry with a port allows that port only
    ("n8n.internal:5678", "n8n.internal", 5678, True),
    ("n8n.internal:5678", "n8n.internal", 5679, False),
    ("n8n.internal:5678", "n8n.internal", None, False),
    ("n8n.internal:443", "n8n.internal", 443, True),
    ("*.internal:8443", "hooks.internal", 8443, True),
    ("*.internal:8443", "hooks.internal", 443, False),
    # IPv6 literals: bare (any port) or in brackets (with a port); one address, any spelling
    ("::1", "::1", 8080, True),
    ("::1", "0:0:0:0:0:0:0:1", 8080, True),
    ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "::1", 8081, False),
    ("[fd00::1]", "FD00::1", 80, True),
    ("fd00::1", "fd00::2", 80, False),
    # several entries
    ("a.internal, b.internal:81", "b.internal", 81, True),
    ("a.internal, b.internal:81", "b.internal", 80, False),
])
def test_an_entry_allows_exactly_what_it_says(entries, host, port, allowed) -> None:
    assert allows(entries, host, port) is allowed


@pytest.mark.parametrize("entry", [
    "http://n8n.internal", "n8n.internal/webhook", "user@n8n.internal", "*", "*.", "*.*.com",
    "host:0", "host:65536", "host:port", "[::1", "[::1]x", "[n8n.internal]:80", "*.10.0.0.1",
    "a..b", "foo bar", "-bad.example.com", "bücher.example", "a" * 64 + ".com",
])
def test_a_malformed_entry_fails_at_start_naming_the_setting(entry) -> None:
    with pytest.raises(ValidationError, match="TASKMAN_ALLOWED_HOSTS"):
        Settings(_env_file=None, TASKMAN_ALLOWED_HOSTS=f"ok.example.com,{entry}")


def test_an_allowed_host_and_port_lets_an_ip_literal_url_through_only_on_that_port() -> None:
    policy = NetworkPolicy(allowed_hosts=frozenset({"127.0.0.1:5678"}))
    check_url("http://127.0.0.1:5678/webhook-waiting/1", policy)
    with pytest.raises(BlockedURL):
        check_url("http://127.0.0.1:5679/webhook-waiting/1", policy)
    with pytest.raises(BlockedURL):
        check_url("http://127.0.0.1/webhook-waiting/1", policy)  # port 80


def test_an_ipv6_url_matches_a_bracketed_entry() -> None:
    policy = NetworkPolicy(allowed_hosts=frozenset({"[::1]:8080"}))
    check_url("http://[::1]:8080/x", policy)
    with pytest.raises(BlockedURL):
        check_url("http://[::1]:8081/x", policy)


def test_an_entry_parses_to_its_parts() -> None:
    assert AllowedHost.parse(" *.Hooks.Example.com.:8443 ") == AllowedHost(
        "hooks.example.com", 8443, wildcard=True)


# --- the check when a task is created --------------------------------------------------------

STRICT = NetworkPolicy()


def fake_dns(table: dict[str, list[str]]):
    def lookup(host: str, port: int | None) -> list[str]:
        return table.get(host, [])
    return lookup


def refusal(urls: dict[str, str | None], policy: NetworkPolicy = STRICT,
            dns: dict[str, list[str]] | None = None) -> RefusedURL:
    with pytest.raises(RefusedURL) as caught:
        check_task_urls(urls, policy, fake_dns(dns or {}))
    return caught.value


def test_a_callback_url_on_localhost_is_refused_naming_the_field_and_the_setting() -> None:
    policy = NetworkPolicy(allowed_hosts=frozenset({"127.0.0.1"}))
    exc = refusal({"poll_url": "http://127.0.0.1:8000/jobs/1",
                   "callback_url": "http://localhost:5678/webhook-waiting/7"},
                  policy, {"localhost": ["127.0.0.1", "::1"]})
    assert exc.field == "callback_url"
    message = str(exc)
    assert message.startswith("callback_url: localhost resolves to a non-public address")
    assert "TASKMAN_ALLOWED_HOSTS" in message and "localhost:5678" in message
    assert "127.0.0.1" not in message  # the address a name resolved to stays service-side


def test_a_poll_url_on_a_private_ip_literal_is_refused() -> None:
    exc = refusal({"poll_url": "http://10.0.0.7/jobs/1", "callback_url": None})
    assert exc.field == "poll_url"
    assert "10.0.0.7 is a non-public address" in str(exc)
    assert "TASKMAN_ALLOW_PRIVATE_NETWORKS=true" in str(exc)


def test_one_private_address_among_public_ones_refuses_the_name() -> None:
    exc = refusal({"callback_url": "https://hooks.example.com/x"},
                  dns={"hooks.example.com": ["93.184.216.34", "169.254.169.254"]})
    assert exc.field == "callback_url"


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://files.example.com/x", "only http and https"),
    ("https://user:pw@hooks.example.com/x", "user name or password"),
])
def test_urls_the_worker_never_requests_are_refused(url, says) -> None:
    exc = refusal({"callback_url": url})
    assert exc.field == "callback_url" and says in str(exc)


def test_allowed_public_and_unresolvable_urls_pass() -> None:
    policy = NetworkPolicy(allowed_hosts=frozenset({"n8n.internal:5678", "*.svc.internal"}))
    dns = {"n8n.internal": ["10.1.2.3"], "api.svc.internal": ["10.9.9.9"],
           "api.example.com": ["93.184.216.34"]}
    check_task_urls({"poll_url": "https://api.example.com/jobs/1",
                     "callback_url": "http://n8n.internal:5678/webhook-waiting/9"},
                    policy, fake_dns(dns))
    check_task_urls({"poll_url": "http://api.svc.internal/jobs/1"}, policy, fake_dns(dns))
    # Not resolvable now: the worker decides when it gets there.
    check_task_urls({"callback_url": "https://not-yet.example.com/x"}, STRICT, fake_dns({}))
    with pytest.raises(RefusedURL):  # the port is part of the n8n entry
        check_task_urls({"callback_url": "http://n8n.internal:80/webhook-waiting/9"},
                        policy, fake_dns(dns))


def test_the_system_lookup_is_what_the_check_uses_by_default() -> None:
    with pytest.raises(RefusedURL, match="localhost resolves to"):
        check_task_urls({"callback_url": "http://localhost:5678/webhook-waiting/1"}, STRICT)
    check_task_urls({"callback_url": "http://localhost:5678/webhook-waiting/1"},
                    NetworkPolicy(allowed_hosts=frozenset({"localhost"})))
    check_task_urls({"callback_url": "http://localhost:5678/x"}, NetworkPolicy(allow_private=True))
