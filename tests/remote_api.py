"""A scriptable remote status API on 127.0.0.1, for tests of the worker."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer: `json` (or raw `body`) after `delay` seconds."""

    status: int = 200
    json: Any = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def encoded(self) -> bytes:
        return json.dumps(self.json).encode() if self.json is not None else self.body


@dataclass(frozen=True)
class Hit:
    """One request the remote received; `at` is time.monotonic()."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class RemoteAPI:
    """Each path answers its scripted replies in turn, repeating the last; others get 404."""

    def __init__(self, server: ThreadingHTTPServer, scheme: str = "http") -> None:
        self.server = server
        self.port = server.server_address[1]
        self.scheme = scheme
        self._scripts: dict[str, list[Reply]] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> str:
        """Answer `path` with `replies` in turn; returns its URL."""
        with self._lock:
            self._scripts[path] = list(replies)
        return self.url(path)

    def hits(self, path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if h.path == path]

    def _answer(self, hit: Hit) -> Reply:
        with self._lock:
            self._hits.append(hit)
            script = self._scripts.get(hit.path)
            if not script:
                return Reply(404, {"error": "no such task"})
            return script.pop(0) if len(script) > 1 else script[0]


def _handler(remote: list[RemoteAPI]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real APIs

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            hit = Hit(self.command, self.path, dict(self.headers), self.rfile.read(length),
                      time.monotonic())
            reply = remote[0]._answer(hit)
            time.sleep(reply.delay)
            body = reply.encoded()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value.format(port=remote[0].port))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # slow replies must not hold up the test's end

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that gave up (timeouts, killed workers) are expected


@contextmanager
def remote_api(tls: ssl.SSLContext | None = None) -> Iterator[RemoteAPI]:
    """Start a RemoteAPI in a thread (HTTPS with `tls`, a server-side context); stop it
    afterwards."""
    holder: list[RemoteAPI] = []
    server = _Server(("127.0.0.1", 0), _handler(holder))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    holder.append(RemoteAPI(server, "https" if tls else "http"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
