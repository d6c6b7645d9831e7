"""GET /events: live task changes, each client seeing only what it may see."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from typing import Any

import httpx
import pytest

from tests.edge.conftest import API_KEY, user_token

# Generous: a loaded CI machine must not make these flaky. Delivery is usually milliseconds.
DEADLINE = 5.0


class Listener:
    """An SSE client reading /events in a thread."""

    def __init__(self, url: str, token: str | None) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.comments: queue.Queue[str] = queue.Queue()
        self.connected = threading.Event()
        self.status: int | None = None
        self._stop = threading.Event()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._thread = threading.Thread(target=self._read, args=(url, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        with httpx.stream("GET", f"{url}/events", headers=headers, timeout=30) as response:
            self.status = response.status_code
            if response.status_code != 200:
                self.connected.set()
                return
            for line in response.iter_lines():
                if line == ": connected":
                    self.connected.set()
                elif line.startswith(":"):
                    self.comments.put(line)
                elif line.startswith("data: "):
                    self.events.put(json.loads(line.removeprefix("data: ")))
                if self._stop.is_set():  # keep-alives wake this loop twice a second
                    return

    def wait_connected(self) -> None:
        assert self.connected.wait(DEADLINE), "no connection to /events"

    def next_event(self) -> dict[str, Any]:
        return self.events.get(timeout=DEADLINE)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


@pytest.fixture
def listen(edge):
    listeners: list[Listener] = []

    def start(token: str | None) -> Listener:
        listener = Listener(edge.url, token)
        listeners.append(listener)
        listener.wait_connected()
        return listener

    yield start
    for listener in listeners:
        listener.close()


def create(client) -> str:
    return client.post("/tasks", json={"poll_url": "https://api.example.com/s/1"}).json()["task_id"]


def test_events_deliver_a_change_to_a_connected_client(alice, listen) -> None:
    stream = listen(alice.token)

    task_id = create(alice.http)
    created = stream.next_event()
    alice.http.post(f"/tasks/{task_id}/cancel")
    cancelled = stream.next_event()

    assert created == {"task_id": task_id, "status": "pending", "user_id": alice.id}
    assert cancelled == {"task_id": task_id, "status": "cancelled", "user_id": alice.id}


def test_user_id_is_matched_whatever_its_letter_case(edge, listen) -> None:
    sub = str(uuid.uuid4())
    stream = listen(user_token(sub.upper()))

    with edge.client(user_token(sub)) as client:
        task_id = create(client)

    assert stream.next_event()["task_id"] == task_id


def test_user_receives_events_of_own_tasks_only(alice, bob, listen) -> None:
    alice_stream, bob_stream = listen(alice.token), listen(bob.token)

    alices = create(alice.http)
    bobs = create(bob.http)
    assert alice_stream.next_event()["task_id"] == alices
    assert bob_stream.next_event()["task_id"] == bobs
    # Notifications arrive in commit order: had Alice's leaked to Bob, he would have
    # had it before his own.
    alice_marker = create(alice.http)

    assert alice_stream.next_event()["task_id"] == alice_marker
    assert alice_stream.events.empty() and bob_stream.events.empty()


def test_api_key_receives_every_users_events(alice, bob, service, listen) -> None:
    stream = listen(API_KEY)

    expected = {create(alice.http), create(bob.http)}

    assert {stream.next_event()["task_id"] for _ in expected} == expected


def test_quiet_stream_sends_keep_alive_comments(alice, listen) -> None:
    stream = listen(alice.token)

    assert stream.comments.get(timeout=DEADLINE) == ": keep-alive"


def test_events_require_credentials(edge) -> None:
    listener = Listener(edge.url, token=None)
    listener.wait_connected()
    listener.close()

    assert listener.status == 401
