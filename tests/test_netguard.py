"""SSRF protection for polls, against a real HTTP server on 127.0.0.1; no database needed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from worker.remote.netguard import (
    BlockedURL,
    NetworkPolicy,
    check_url,
    guarded_session,
    is_blocked_address,
)

PUBLIC = NetworkPolicy()
LOCAL_SERVER_ALLOWED = NetworkPolicy(allowed_hosts=frozenset({"127.0.0.1"}))


@dataclass
class LocalServer:
    port: int
    paths: list[str] = field(default_factory=list)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """Answers 200 on /ok and redirects /to/<host> to http://<host>[:port]/other."""
    redirects = {
        "/to/localhost": "localhost:{port}/other",
        "/to/self": "127.0.0.1:{port}/ok",
        "/to/private": "10.0.0.1/",
        "/to/metadata": "169.254.169.254/latest/meta-data/",
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            local.paths.append(self.path)
            if self.path in redirects:
                self.send_response(302)
                target = redirects[self.path].format(port=local.port)
                self.send_header("Location", f"http://{target}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    local = LocalServer(port=httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield local
    httpd.shutdown()
    httpd.server_close()


@dataclass(frozen=True)
class Got:
    status_code: int
    text: str


class ScriptedResolver(AbstractResolver):
    """A DNS server under the test's control: each lookup of a name gets the next answer
    (the last one repeating), as a rebinding DNS server with TTL 0 would give them."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: object = None) -> list[ResolveResult]:
        self.lookups.append(host)
        addresses = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [{"hostname": host, "host": a, "port": port, "family": 0, "proto": 0,
                 "flags": 0} for a in addresses]

    async def close(self) -> None:
        pass


def get(url: str, policy: NetworkPolicy, resolver: AbstractResolver | None = None) -> Got:
    async def main() -> Got:
        # A short timeout: if a refusal ever came too late, the test fails fast on a
        # connect timeout rather than hanging on an unroutable address.
        async with guarded_session(policy, timeout=aiohttp.ClientTimeout(total=1.0),
                                   resolver=resolver) as session, \
                session.get(url, allow_redirects=True) as response:
            return Got(response.status, await response.text())

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:{port}/ok", "127.0.0.1 is a non-public address"),
        ("http://[::1]:{port}/ok", "::1 is a non-public address"),
        ("http://10.0.0.1/", "10.0.0.1 is a non-public address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a non-public address"),
        ("http://localhost:{port}/ok", "localhost resolves to a non-public address"),
    ],
)
def test_poll_to_a_private_address_is_refused_before_connecting(
    server: LocalServer, url: str, message: str
) -> None:
    seen = len(server.paths)
    with pytest.raises(BlockedURL, match=message):
        get(url.format(port=server.port), PUBLIC)
    assert len(server.paths) == seen


@pytest.mark.parametrize("target", ["localhost", "private", "metadata"])
def test_redirect_to_a_private_address_is_refused_on_the_hop(
    server: LocalServer, target: str
) -> None:
    with pytest.raises(BlockedURL, match="non-public address"):
        get(server.url(f"/to/{target}"), LOCAL_SERVER_ALLOWED)
    assert server.paths[-1] == f"/to/{target}"


def test_redirect_to_an_allowed_host_is_followed(server: LocalServer) -> None:
    response = get(server.url("/to/self"), LOCAL_SERVER_ALLOWED)
    assert (response.status_code, response.text) == (200, "ok")
    assert server.paths[-2:] == ["/to/self", "/ok"]


def test_a_session_that_let_an_origin_through_still_checks_every_other(
    server: LocalServer,
) -> None:
    """The middleware remembers origins that passed, for speed: another port or address
    on the same session is still refused, on every request."""
    allowed = NetworkPolicy(allowed_hosts=frozenset({f"127.0.0.1:{server.port}"}))

    async def main() -> None:
        async with guarded_session(allowed,
                                   timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            for _ in range(2):
                async with session.get(server.url("/ok")) as response:
                    assert response.status == 200
                with pytest.raises(BlockedURL, match=r"127\.0\.0\.1 is a non-public address"):
                    await session.get(f"http://127.0.0.1:{server.port + 1}/ok")
                with pytest.raises(BlockedURL, match="::1 is a non-public address"):
                    await session.get(f"http://[::1]:{server.port}/ok")

    seen = len(server.paths)
    asyncio.run(main())
    assert server.paths[seen:] == ["/ok", "/ok"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_private_networks_are_reachable_when_allowed(server: LocalServer, host: str) -> None:
    response = get(server.url("/ok", host=host), NetworkPolicy(allow_private=True))
    assert (response.status_code, response.text) == (200, "ok")


def test_allowed_hosts_match_ignoring_case(server: LocalServer) -> None:
    policy = NetworkPolicy(allowed_hosts=frozenset({"LocalHost"}))
    assert get(server.url("/ok", host="localhost"), policy).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_an_allowed_host_with_a_port_is_reachable_on_that_port_only(
    server: LocalServer, host: str
) -> None:
    """Through the real connector: the resolver (names) and the URL check (IP literals)
    both see the port being connected to."""
    allowed = NetworkPolicy(allowed_hosts=frozenset({f"{host}:{server.port}"}))
    assert get(server.url("/ok", host=host), allowed).status_code == 200
    other_port = NetworkPolicy(allowed_hosts=frozenset({f"{host}:{server.port + 1}"}))
    seen = len(server.paths)
    with pytest.raises(BlockedURL, match="non-public address"):
        get(server.url("/ok", host=host), other_port)
    assert len(server.paths) == seen


def test_a_wildcard_never_covers_the_bare_name(server: LocalServer) -> None:
    with pytest.raises(BlockedURL, match="localhost resolves to a non-public address"):
        get(server.url("/ok", host="localhost"), NetworkPolicy(allowed_hosts=frozenset(
            {"*.localhost"})))


def test_host_with_any_private_address_is_refused_and_users_read_no_address() -> None:
    resolver = ScriptedResolver(["93.184.215.14", "10.1.2.3"])
    with pytest.raises(BlockedURL, match=r"mixed\.example resolves to a non-public address;") \
            as refused:
        get("http://mixed.example/", PUBLIC, resolver)
    assert "10.1.2.3" not in str(refused.value)  # what users read
    assert refused.value.detail == "mixed.example resolves to 10.1.2.3, a non-public address"


def test_the_address_checked_is_the_address_connected_to(server: LocalServer) -> None:
    # A rebinding DNS server: a public address for the check, 127.0.0.1 for whoever asks
    # next. The name is looked up once, and the connection goes to the checked address
    # (which does not answer here), never to the local server behind the second answer.
    resolver = ScriptedResolver(["93.184.215.14"], ["127.0.0.1"])
    seen = len(server.paths)
    with pytest.raises((aiohttp.ClientError, TimeoutError)):
        get(f"http://rebind.example:{server.port}/ok", PUBLIC, resolver)
    assert resolver.lookups == ["rebind.example"]
    assert len(server.paths) == seen


def test_a_name_resolving_to_loopback_first_is_refused_before_connecting(
    server: LocalServer,
) -> None:
    resolver = ScriptedResolver(["127.0.0.1"], ["93.184.215.14"])
    seen = len(server.paths)
    with pytest.raises(BlockedURL, match=r"rebind\.example resolves to a non-public address"):
        get(f"http://rebind.example:{server.port}/ok", PUBLIC, resolver)
    assert len(server.paths) == seen


def test_an_allowed_name_connects_to_what_it_resolves_to(server: LocalServer) -> None:
    resolver = ScriptedResolver(["127.0.0.1"])
    policy = NetworkPolicy(allowed_hosts=frozenset({"status.internal"}))
    got = get(f"http://status.internal:{server.port}/ok", policy, resolver)
    assert (got.status_code, got.text) == (200, "ok")


def test_unresolvable_host_is_an_ordinary_network_error_not_a_refusal() -> None:
    # A DNS error (retried as transient by the poller), never a BlockedURL.
    with pytest.raises(aiohttp.ClientConnectorError, match=r"nothing\.invalid"):
        get("http://nothing.invalid/", PUBLIC)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "only http and https URLs are allowed, not 'ftp'"),
        ("file:///etc/passwd", "only http and https URLs are allowed, not 'file'"),
        ("http:///status", "the URL has no host"),
        ("https://user:secret@example.com/", "URLs with a user name or password are not allowed"),
        ("http://[::ffff:127.0.0.1]/", "is a non-public address"),
        ("http://2130706433/", "is a non-public address"),
        ("http://0x7f.0.0.1/", "is a non-public address"),
        ("http://127.1/", "is a non-public address"),
        ("http://0/", "is a non-public address"),
        ("http://[fe80::1]/", "is a non-public address"),
    ],
)
def test_unsafe_poll_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(BlockedURL, match=message):
        check_url(url, PUBLIC)


@pytest.mark.parametrize(
    "url",
    ["https://example.com/status", "http://93.184.215.14:8080/x", "https://[2606:4700::1111]/"],
)
def test_public_urls_pass_the_check(url: str) -> None:
    check_url(url, PUBLIC)


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.1.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("fec0::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("2002:7f00:1::", True),
        ("2002:a00:1::", True),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),
        ("8.8.8.8", False),
        ("93.184.215.14", False),
        ("2606:4700::1111", False),
        ("::ffff:8.8.8.8", False),
        ("2002:808:808::1", False),
    ],
)
def test_only_public_unicast_addresses_are_allowed(address: str, blocked: bool) -> None:
    assert is_blocked_address(ip_address(address)) is blocked
