"""``taskman edge`` as a process, as a hostile client meets it: stream caps that leave
room for everyone else, and callback tokens kept out of its log."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.edge.conftest import API_KEY, JWT_SECRET, user_token
from tests.worker_harness import REPO, wait_until
from worker.devtools.pgcluster import free_port


class EdgeProcess:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def client(self, token: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def open_stream(self, token: str) -> tuple[int, socket.socket]:
        """Open GET /events on a raw socket and keep it open; returns the status code."""
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        status_line = sock.recv(64).split(b"\r\n", 1)[0]
        return int(status_line.split()[1]), sock


@pytest.fixture
def start_edge(database_url: str, tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    started: list[subprocess.Popen] = []

    def start(files: int | None = None, **env: str) -> EdgeProcess:
        port = free_port()
        log = tmp_path / f"edge-{port}.log"
        environ = {**os.environ, "DATABASE_URL": database_url, "TASKMAN_API_KEYS": API_KEY,
                   "SUPABASE_JWT_SECRET": JWT_SECRET, **env}

        def limit_files() -> None:
            if files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "edge", "--port", str(port)], cwd=REPO,
                env=environ, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_files)
        started.append(process)
        edge = EdgeProcess(f"http://127.0.0.1:{port}", process, log)

        def healthy() -> bool:
            try:
                return httpx.get(f"{edge.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, log.read_text()
                return False

        wait_until(healthy, timeout=30)
        return edge

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _everyone_else_is_served(edge: EdgeProcess) -> None:
    """The health check, the API and a third party's callback all answer at once."""
    started = time.monotonic()
    with edge.client(token=None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
    with edge.client() as service:
        task = service.post("/tasks", json={"task_type": "report"}).json()
        assert service.get(f"/tasks/{task['task_id']}").status_code == 200
        done = service.post(f"/callbacks/{task['task_id']}", json={"status": "completed"},
                            headers={"X-Taskman-Callback-Token": task["callback_token"]})
        assert done.status_code == 200, done.text
    assert time.monotonic() - started < 5


def test_event_streams_are_capped_per_user_and_in_all(start_edge) -> None:
    edge = start_edge(TASKMAN_EVENTS_MAX_STREAMS_PER_USER="2", TASKMAN_EVENTS_MAX_STREAMS="3")
    alice, bob, carol = (user_token(str(uuid.uuid4())) for _ in range(3))
    held = []
    try:
        for _ in range(2):
            status, sock = edge.open_stream(alice)
            held.append(sock)
            assert status == 200
        with edge.client(alice) as client:
            refused = client.get("/events")
        assert refused.status_code == 429
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["code"] == "too_many_streams"

        status, sock = edge.open_stream(bob)
        held.append(sock)
        assert status == 200
        assert edge.open_stream(carol)[0] == 429  # the edge's cap, though carol holds none
        _everyone_else_is_served(edge)

        held.pop(0).close()  # alice leaves one stream: its place is free again
        status, sock = wait_until(lambda: (s := edge.open_stream(alice))[0] == 200 and s)
        held.append(sock)
    finally:
        for sock in held:
            sock.close()


def test_one_user_holding_every_stream_leaves_the_edge_room_under_a_low_file_limit(
    start_edge,
) -> None:
    edge = start_edge(files=128, TASKMAN_EVENTS_MAX_STREAMS_PER_USER="10000")
    mallory = user_token(str(uuid.uuid4()))
    held = []
    try:
        while len(held) < 200:
            status, sock = edge.open_stream(mallory)
            held.append(sock)
            if status == 429:
                break
        assert status == 429, "the streams were never capped"
        assert len(held) - 1 <= 64  # half of the 128 files the process may open
        _everyone_else_is_served(edge)
    finally:
        for sock in held:
            sock.close()
    assert "serving at most 64 event streams" in edge.log.read_text()


def test_callback_tokens_never_reach_the_edge_log(start_edge) -> None:
    edge = start_edge()
    with edge.client() as service:
        by_query = service.post("/tasks", json={}).json()
        by_header = service.post("/tasks", json={}).json()
    with edge.client(token=None) as remote:
        answered = [
            remote.post(f"/callbacks/{by_query['task_id']}",
                        params={"token": by_query["callback_token"]},
                        json={"progress": 10}),
            remote.post(f"/callbacks/{by_header['task_id']}", json={"progress": 10},
                        headers={"X-Taskman-Callback-Token": by_header["callback_token"]}),
            remote.post(f"/callbacks/{by_header['task_id']}", json={"progress": 20}),
        ]
    assert [r.status_code for r in answered] == [200, 200, 403]

    log = wait_until(lambda: (text := edge.log.read_text()).count("/callbacks/") >= 3 and text)
    assert by_query["callback_token"] not in log
    assert by_header["callback_token"] not in log
    assert f"/callbacks/{by_query['task_id']}?token=[redacted]" in log
