"""One poll turned into one outcome, against a real HTTP server; no database needed."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hostile_remote import Attack, HostileRemote, forever, hostile_remote, once, response
from tests.remote_api import Reply, remote_api
from tests.worker_harness import worker_settings
from worker.domain import ClaimedTask
from worker.polling.poller import Poller, make_session

GENERIC = json.dumps({"name": "generic", "status_path": "status", "completed_values": ["done"],
                      "running_values": ["running"], "pending_values": ["queued"],
                      "result_path": "result", "progress_path": "progress"})


def poll(url: str, *, method: str = "GET", body: Any = None, attempt_count: int = 0,
         error_count: int = 0, profile: str = GENERIC, headers: dict[str, str] | None = None,
         **env: Any) -> dict[str, Any]:
    """The outcome of polling a task at `url` once."""
    task = ClaimedTask(task_id=str(uuid.uuid4()), poll_url=url, poll_method=method,
                       poll_headers=headers or {},
                       poll_body=None if body is None else json.dumps(body), profile=profile,
                       attempt_count=attempt_count, error_count=error_count,
                       poll_interval_seconds=10)

    settings = worker_settings("postgresql://unused", **env)

    async def once() -> dict[str, Any]:
        async with make_session(settings) as session:
            return await Poller(session, settings, "w1", rand=lambda: 0.5).poll(task)

    return asyncio.run(once())


def test_a_503_with_retry_after_waits_as_asked(remote) -> None:
    outcome = poll(remote.script("/a", Reply(503, headers={"Retry-After": "7"})))
    assert (outcome["ok"], outcome["delay_seconds"], outcome["http_status"]) == (False, 7, 503)


def test_a_transient_failure_backs_off_exponentially_with_jitter(remote) -> None:
    url = remote.script("/b", Reply(500))
    delays = [poll(url, error_count=n, TASKMAN_RETRY_BASE="1", TASKMAN_RETRY_MAX="100",
                   TASKMAN_MIN_POLL_INTERVAL="0.2")["delay_seconds"] for n in range(4)]
    # rand() = 0.5 of the way from the floor to base * 2**(n-1)
    assert delays == pytest.approx([0.6, 1.1, 2.1, 4.1])


def test_a_long_running_task_is_polled_less_often(remote) -> None:
    url = remote.script("/c", Reply(json={"status": "running", "progress": "40"}))
    early, late = poll(url, attempt_count=1), poll(url, attempt_count=10)
    assert (early["status"], early["progress"], early["delay_seconds"]) == (
        "in_progress", 40, 10)
    assert late["delay_seconds"] > 10


def test_a_202_with_retry_after_sets_the_next_poll_even_while_pending(remote) -> None:
    outcome = poll(remote.script("/d", Reply(202, json={"status": "queued"},
                                             headers={"Retry-After": "2"})))
    assert (outcome["ok"], outcome.get("status"), outcome["delay_seconds"]) == (True, None, 2)


def test_a_303_after_a_post_is_fetched_with_get_and_no_body(remote) -> None:
    url = remote.script("/e", Reply(303, headers={"Location": "/e/result"}))
    remote.script("/e/result", Reply(json={"status": "done", "result": 1}))
    outcome = poll(url, method="POST", body={"id": 5})
    assert (outcome["status"], outcome["result"]) == ("completed", 1)
    (first,), (second,) = remote.hits("/e"), remote.hits("/e/result")
    assert (first.method, first.body) == ("POST", b'{"id": 5}')
    assert (second.method, second.body) == ("GET", b"")


def test_a_redirect_loop_fails_the_poll(remote) -> None:
    url = remote.script("/f", Reply(302, headers={"Location": "/f"}))
    outcome = poll(url)
    assert (outcome["status"], outcome["error_code"]) == ("failed", "poll_error")
    assert "redirected more than 5 times" in outcome["error_message"]


def test_an_invalid_profile_override_fails_without_polling(remote) -> None:
    bad = json.dumps({"name": "generic", "status_path": "status[["})
    outcome = poll(remote.script("/g", Reply(json={"status": "done"})), profile=bad)
    assert (outcome["status"], outcome["error_code"]) == ("failed", "invalid_response")
    assert "status_path" in outcome["error_message"]
    assert remote.hits("/g") == []


def test_an_unreachable_host_is_a_transient_failure() -> None:
    outcome = poll("http://127.0.0.1:9/status")  # discard port: nothing listens
    assert (outcome["ok"], outcome.get("status")) == (False, None)
    assert outcome["raw_error"].startswith("ConnectError")


def _compressed(remote: HostileRemote, path: str, coding: str, body: bytes) -> str:
    return remote.attack(path, once(response("200 OK", body, {
        "Content-Type": "application/json", "Content-Encoding": coding})))


DONE_BODY = b'{"status": "done", "result": {"rows": 3}}'


@pytest.mark.parametrize(("coding", "encoded"), [
    ("gzip", gzip.compress(DONE_BODY)), ("x-gzip", gzip.compress(DONE_BODY)),
    ("deflate", zlib.compress(DONE_BODY)),
    ("deflate", zlib.compress(DONE_BODY)[2:-4]),  # raw deflate, as some servers send it
    ("identity", DONE_BODY),
])
def test_compressed_answers_are_read(coding, encoded) -> None:
    with hostile_remote() as remote:
        outcome = poll(_compressed(remote, "/z", coding, encoded))
    assert (outcome["status"], outcome["result"]) == ("completed", {"rows": 3})


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_the_size_cap_applies_after_decompression(coding) -> None:
    bomb = (gzip.compress if coding == "gzip" else zlib.compress)(b" " * (64 << 20), 9)
    with hostile_remote() as remote:
        outcome = poll(_compressed(remote, "/bomb", coding, bomb),
                       TASKMAN_MAX_RESPONSE_BYTES="65536")
    assert len(bomb) < 65536  # small on the wire
    assert (outcome["ok"], outcome["error_code"], outcome["reason"]) == (
        False, "invalid_response", "response_too_large")
    assert "exceeded 65536 bytes" in outcome["raw_error"]


@pytest.mark.parametrize(("coding", "body", "says"), [
    ("br", b"\x0b\x02\x80{}\x03", "unsupported Content-Encoding: 'br'"),
    ("gzip", b"\x1f\x8bnot really gzip", "corrupt"),
])
def test_answers_that_cannot_be_decoded_are_unreadable(coding, body, says) -> None:
    with hostile_remote() as remote:
        outcome = poll(_compressed(remote, "/odd", coding, body))
    assert (outcome["ok"], outcome["error_code"], outcome["reason"]) == (
        False, "invalid_response", "undecodable_body")
    assert says in outcome["raw_error"]


def test_a_body_that_never_ends_is_cut_by_the_poll_timeout() -> None:
    trickle = Attack(lambda: _then_forever(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b" "), pause=0.1)
    with hostile_remote() as remote:
        started = time.monotonic()
        outcome = poll(remote.attack("/slow", trickle), TASKMAN_POLL_TIMEOUT="1")
    assert 1 <= time.monotonic() - started < 3
    assert (outcome["ok"], outcome["reason"]) == (False, "timeout")


def test_a_remote_that_always_says_now_is_polled_no_sooner_than_the_floor(remote) -> None:
    url = remote.script("/now", Reply(202, json={"status": "running"},
                                      headers={"Retry-After": "0"}))
    assert poll(url, TASKMAN_MIN_POLL_INTERVAL="1")["delay_seconds"] == 1
    url = remote.script("/busy", Reply(429, headers={"Retry-After": "0"}))
    assert poll(url, TASKMAN_MIN_POLL_INTERVAL="1")["delay_seconds"] == 1
    url = remote.script("/err", Reply(500))
    assert poll(url, TASKMAN_MIN_POLL_INTERVAL="1", TASKMAN_RETRY_BASE="0.01")[
        "delay_seconds"] == 1


def test_a_claim_the_poller_cannot_handle_fails_its_task_with_a_message(remote) -> None:
    outcome = poll(remote.script("/x", Reply(json={"status": "done"})), profile="{not json")
    assert (outcome["status"], outcome["error_code"], outcome["reason"]) == (
        "failed", "poll_error", "unexpected_error")
    assert "unexpected JSONDecodeError" in outcome["error_message"]


def _then_forever(first: bytes, chunk: bytes) -> Iterator[bytes]:
    yield first
    yield from forever(chunk)


# What the poller guarantees whatever HTTP client it uses ---------------------------------


def test_a_refused_address_reads_neutrally_and_keeps_the_address_for_the_service(
        remote) -> None:
    outcome = poll(remote.script("/private", Reply(json={"status": "done"})).replace(
        "127.0.0.1", "localhost"), TASKMAN_ALLOW_PRIVATE_NETWORKS="false")
    assert (outcome["status"], outcome["error_code"], outcome["reason"]) == (
        "failed", "poll_error", "blocked_by_network_policy")
    assert outcome["error_message"].startswith("localhost resolves to a non-public address;")
    assert "127.0.0.1" not in outcome["error_message"] and "::1" not in outcome["error_message"]
    assert "127.0.0.1" in outcome["raw_error"] or "::1" in outcome["raw_error"]
    assert remote.hits("/private") == []


def test_a_redirect_is_checked_on_every_hop(remote) -> None:
    # 127.0.0.1 is allowed, localhost (where the redirect points) is not.
    url = remote.script("/hop", Reply(302, headers={"Location": "http://localhost:{port}/in"}))
    remote.script("/in", Reply(json={"status": "done"}))
    outcome = poll(url, TASKMAN_ALLOW_PRIVATE_NETWORKS="false",
                   TASKMAN_ALLOWED_HOSTS="127.0.0.1")
    assert (outcome["error_code"], outcome["reason"]) == ("poll_error",
                                                          "blocked_by_network_policy")
    assert len(remote.hits("/hop")) == 1 and remote.hits("/in") == []


def test_a_redirect_to_another_origin_drops_the_tasks_headers(remote) -> None:
    with remote_api() as other:
        target = other.script("/result", Reply(json={"status": "done", "result": 2}))
        url = remote.script("/go", Reply(307, headers={"Location": target}))
        outcome = poll(url, headers={"Authorization": "Bearer secret"})
        (hit,) = other.hits("/result")
    assert (outcome["status"], outcome["result"]) == ("completed", 2)
    assert remote.hits("/go")[0].headers["Authorization"] == "Bearer secret"
    assert "Authorization" not in hit.headers


def test_a_cookie_one_tasks_remote_sets_is_never_sent_for_another_task(remote) -> None:
    """Polls share one session: a cookie kept there would go with every later request to
    that host, whoever's task it is."""
    remote.script("/a", Reply(json={"status": "running"},
                              headers={"Set-Cookie": "session=of-task-a; Path=/"}))
    remote.script("/b", Reply(json={"status": "running"}))
    # By name: cookies are not kept for an IP address.
    first, second = remote.url("/a", host="localhost"), remote.url("/b", host="localhost")
    settings = worker_settings("postgresql://unused")

    def task(url: str) -> ClaimedTask:
        return ClaimedTask(task_id=str(uuid.uuid4()), poll_url=url, poll_method="GET",
                           poll_headers={}, poll_body=None, profile=GENERIC, attempt_count=0,
                           error_count=0, poll_interval_seconds=10)

    async def both() -> None:
        async with make_session(settings) as session:
            poller = Poller(session, settings, "w1")
            await poller.poll(task(first))
            await poller.poll(task(second))
            await poller.poll(task(first))

    asyncio.run(both())
    assert remote.hits("/a")[0].status == 200
    assert ["Cookie" in hit.headers for hit in remote.hits("/b") + remote.hits("/a")] == [False] * 3


@pytest.mark.parametrize("host", ["a..example", "x" * 64 + ".example", ".example"])
def test_a_host_name_no_resolver_can_encode_fails_its_task(host) -> None:
    outcome = poll(f"http://{host}/status", TASKMAN_ALLOW_PRIVATE_NETWORKS="false")
    assert (outcome["ok"], outcome["status"], outcome["error_code"], outcome["reason"]) == (
        False, "failed", "poll_error", "invalid_url")
    assert "not valid" in outcome["error_message"]


def test_a_remote_that_does_not_answer_in_time_is_a_timeout(remote) -> None:
    url = remote.script("/late", Reply(json={"status": "done"}, delay=3))
    started = time.monotonic()
    outcome = poll(url, TASKMAN_POLL_TIMEOUT="0.5")
    assert time.monotonic() - started < 2
    assert (outcome["ok"], outcome.get("status"), outcome["reason"]) == (False, None, "timeout")


def test_an_answer_over_the_cap_is_not_read_to_its_end() -> None:
    endless = Attack(lambda: _then_forever(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", b"x" * 65536))
    with hostile_remote() as remote:
        started = time.monotonic()
        outcome = poll(remote.attack("/endless", endless), TASKMAN_MAX_RESPONSE_BYTES="1048576")
    assert time.monotonic() - started < 5
    assert (outcome["reason"], outcome["error_code"]) == ("response_too_large",
                                                         "invalid_response")


def test_proxies_from_the_environment_are_not_used(remote, monkeypatch) -> None:
    with remote_api() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url(""))
        outcome = poll(remote.script("/direct", Reply(json={"status": "done"})))
        assert proxy._hits == []
    assert outcome["status"] == "completed" and len(remote.hits("/direct")) == 1


def test_certificates_are_verified(tmp_path) -> None:
    with remote_api(tls=_self_signed(tmp_path)) as remote:
        outcome = poll(remote.script("/tls", Reply(json={"status": "done"})))
        assert remote.hits("/tls") == []  # no request was sent over the unverified connection
    assert (outcome["ok"], outcome.get("status"), outcome["reason"]) == (
        False, None, "connection_error")
    assert "certificate verify failed" in outcome["raw_error"]


def _self_signed(directory: Any) -> Any:
    """A server-side TLS context with a fresh self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context
