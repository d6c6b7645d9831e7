"""One poll turned into one outcome, against a real HTTP server; no database needed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.remote_api import RemoteAPI, Reply, remote_api
from tests.worker_harness import worker_settings
from worker.poller import ClaimedTask, Poller, make_clients

GENERIC = json.dumps({"name": "generic", "status_path": "status", "completed_values": ["done"],
                      "running_values": ["running"], "pending_values": ["queued"],
                      "result_path": "result", "progress_path": "progress"})


@pytest.fixture
def remote() -> Iterator[RemoteAPI]:
    with remote_api() as api:
        yield api


def poll(url: str, *, method: str = "GET", body: Any = None, attempt_count: int = 0,
         error_count: int = 0, profile: str = GENERIC, **env: Any) -> dict[str, Any]:
    """The outcome of polling a task at `url` once."""
    task = ClaimedTask(task_id=uuid.uuid4(), poll_url=url, poll_method=method, poll_headers={},
                       poll_body=None if body is None else json.dumps(body), profile=profile,
                       attempt_count=attempt_count, error_count=error_count,
                       poll_interval_seconds=10)

    settings = worker_settings("postgresql://unused", **env)

    async def once() -> dict[str, Any]:
        clients = make_clients(settings)
        try:
            return await Poller(clients, settings, "w1", rand=lambda: 0.5).poll(task)
        finally:
            for client in clients:
                await client.aclose()

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
