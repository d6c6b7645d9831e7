"""A status API on 127.0.0.1 that answers with raw bytes of the test's choosing: broken status
lines, bodies that never end or trickle, compression bombs, redirect loops, odd headers.

Each path is given an Attack: the bytes of a response (head and body), sent as is, or a
generator of chunks sent with a pause between them until the client goes away.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Attack:
    """What one path answers. `chunks` (called per request) yields the bytes to send,
    `pause` seconds apart; the connection closes after the last one."""

    chunks: Callable[[], Iterable[bytes]]
    pause: float = 0.0


def response(status: str, body: bytes = b"", headers: dict[str, str] | None = None,
             *, length: bool = True) -> bytes:
    """Raw HTTP/1.1 response bytes; `status` is the whole status line after the version."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def once(data: bytes) -> Attack:
    return Attack(lambda: [data])


class HostileRemote:
    """Answers each path with its Attack (404 for others); records when each was hit."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._attacks: dict[str, Attack] = {}
        self._hits: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        remote = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                remote._serve(self.request)

        self._server = socketserver.ThreadingTCPServer((host, 0), Handler,
                                                       bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.block_on_close = False
        self._server.server_bind()
        self._server.server_activate()
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def attack(self, path: str, attack: Attack) -> str:
        with self._lock:
            self._attacks[path] = attack
        return self.url(path)

    def hits(self, path: str) -> list[float]:
        """time.monotonic() of each request for `path`."""
        with self._lock:
            return list(self._hits.get(path, []))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = sock.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode("latin-1")
            with self._lock:
                self._hits.setdefault(path, []).append(time.monotonic())
                attack = self._attacks.get(path)
            if attack is None:
                sock.sendall(response("404 Not Found", b'{"error": "no such task"}'))
                return
            for i, chunk in enumerate(attack.chunks()):
                if i and attack.pause:
                    time.sleep(attack.pause)
                sock.sendall(chunk)
        except OSError:
            pass  # the client gave up: expected for bodies that never end


def forever(chunk: bytes) -> Iterator[bytes]:
    while True:
        yield chunk


@contextmanager
def hostile_remote(host: str = "127.0.0.1") -> Iterator[HostileRemote]:
    remote = HostileRemote(host)
    try:
        yield remote
    finally:
        remote.close()
