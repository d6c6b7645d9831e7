"""The fake remote for tests: an HTTP server on 127.0.0.1 standing in for status APIs,
callback receivers and Slack.

Each scripted path answers its replies in turn, repeating the last; every other path
gets the default reply (404 unless given). Every request is recorded with what was
answered. ``stop()`` closes the port, so clients see connection refused, and
``start()`` listens on the same port again. (For answers HTTP itself cannot describe,
broken status lines or bodies that never end, tests.hostile_remote sends raw bytes.)
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NOT_FOUND = None  # the default reply: 404


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
    """One request the remote received; `at` is time.monotonic(), `status` what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


class RemoteAPI:
    """The fake remote; see the module docstring."""

    def __init__(self, default: Reply | None = NOT_FOUND,
                 tls: ssl.SSLContext | None = None) -> None:
        self.default = default or Reply(404, {"error": "no such task"})
        self.port = 0
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self._scripts: dict[str, list[Reply]] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.start()

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> str:
        """Answer `path` with `replies` in turn; returns its URL."""
        with self._lock:
            self._scripts[path] = list(replies)
        return self.url(path)

    def hits(self, path: str | None = None) -> list[Hit]:
        """The requests received (for `path` only, when given), oldest first."""
        with self._lock:
            return [h for h in self._hits if path is None or h.path == path]

    def delivered(self) -> list[Hit]:
        """The requests answered with a 2xx."""
        return [h for h in self.hits() if 200 <= h.status < 300]

    # The default reply's parts, as receiver tests change them between requests.
    @property
    def status(self) -> int:
        return self.default.status

    @status.setter
    def status(self, status: int) -> None:
        self.default = dataclasses.replace(self.default, status=status)

    @property
    def headers(self) -> dict[str, str]:
        return self.default.headers

    @headers.setter
    def headers(self, headers: dict[str, str]) -> None:
        self.default = dataclasses.replace(self.default, headers=headers)

    def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        self._server = _Server(("127.0.0.1", self.port), _handler(self))
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, hit: Hit) -> Reply:
        with self._lock:
            script = self._scripts.get(hit.path)
            reply = self.default
            if script:
                reply = script.pop(0) if len(script) > 1 else script[0]
            self._hits.append(dataclasses.replace(hit, status=reply.status))
            return reply


def _handler(remote: RemoteAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real APIs

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            hit = Hit(self.command, self.path, dict(self.headers), self.rfile.read(length),
                      time.monotonic())
            reply = remote._answer(hit)
            time.sleep(reply.delay)
            body = reply.encoded()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value.format(port=remote.port))
            if reply.json is not None and "content-type" not in map(str.lower, reply.headers):
                self.send_header("Content-Type", "application/json")
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
    allow_reuse_address = True  # start() again on the same port
    request_queue_size = 128  # the default 5 resets bursts of concurrent senders

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that gave up (timeouts, killed workers) are expected


@contextmanager
def remote_api(default: Reply | None = NOT_FOUND,
               tls: ssl.SSLContext | None = None) -> Iterator[RemoteAPI]:
    """A RemoteAPI for the block (HTTPS with `tls`, a server-side context); stopped
    afterwards."""
    remote = RemoteAPI(default, tls)
    try:
        yield remote
    finally:
        remote.stop()


def start_receiver(status: int = 200, answer: Any = "ok") -> RemoteAPI:
    """A RemoteAPI answering every path with `status` and the JSON `answer`, as a
    callback receiver or Slack's endpoint would; stop() it when done."""
    return RemoteAPI(Reply(status, json=answer))
