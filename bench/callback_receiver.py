"""A minimal, fast HTTP/1.1 receiver for the callback benchmark, in its own process.

Every POST is answered 200 at once, and its arrival (wall clock) is noted with the
``task_id`` of its JSON body; every other GET answers ``{"status": "running"}`` (a poll
of a task still running) and is noted too. ``GET /arrivals`` returns what was noted
since the last call, as JSON ``{"posts": [[task_id, t], ...], "gets": [t, ...]}``.

    python -m bench.callback_receiver   # prints the port it listens on, then serves
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
RUNNING_BODY = b'{"status": "running"}'
RUNNING = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(RUNNING_BODY)).encode() + b"\r\n\r\n" + RUNNING_BODY)
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_TASK_ID = re.compile(rb'"task_id":"([0-9a-f-]{36})"')

posts: list[tuple[str, float]] = []
gets: list[float] = []


class Receiver(asyncio.Protocol):
    """Answers each request of a keep-alive connection, bodies read by Content-Length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            length = _LENGTH.search(head)
            size = int(length.group(1)) if length else 0
            if len(self.buffer) < end + 4 + size:
                return
            body = self.buffer[end + 4:end + 4 + size]
            self.buffer = self.buffer[end + 4 + size:]
            now = time.time()
            if head.startswith(b"POST"):
                found = _TASK_ID.search(body)
                posts.append((found.group(1).decode() if found else "", now))
                self.transport.write(OK)
            elif head.startswith(b"GET /arrivals"):
                answer = json.dumps({"posts": posts, "gets": gets}).encode()
                posts.clear()
                gets.clear()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: "
                                     + str(len(answer)).encode() + b"\r\n\r\n" + answer)
            else:
                gets.append(now)
                self.transport.write(RUNNING)


async def _serve() -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(Receiver, sock=sock, backlog=1024)
    print(sock.getsockname()[1], flush=True)
    await server.serve_forever()


@contextmanager
def callback_receiver() -> Iterator[str]:
    """Start the receiver in a subprocess; yields its base URL."""
    process = subprocess.Popen([sys.executable, "-m", "bench.callback_receiver"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"http://127.0.0.1:{process.stdout.readline().strip()}"
    finally:
        process.terminate()
        process.wait()


async def arrivals(base_url: str) -> dict[str, Any]:
    """What the receiver noted since the last call (and forget it there)."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"{base_url}/arrivals") as response:
        return await response.json(content_type=None)


if __name__ == "__main__":
    asyncio.run(_serve())
