"""A minimal, fast HTTP/1.1 status API for benchmarks: every GET answers "done" at once.

Runs in its own process so that it does not compete with what is measured for the GIL:

    python -m bench.instant_remote   # prints the port it listens on, then serves
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BODY = b'{"status": "done", "result": {"ok": true}}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


class InstantStatus(asyncio.Protocol):
    """Answers each request (bodyless, possibly pipelined) with RESPONSE."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        requests = self.buffer.count(b"\r\n\r\n")
        if requests:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(RESPONSE * requests)


async def _serve() -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(InstantStatus, sock=sock,
                                                            backlog=1024)
    print(sock.getsockname()[1], flush=True)
    await server.serve_forever()


@contextmanager
def instant_remote() -> Iterator[str]:
    """Start the server in a subprocess; yields its base URL."""
    process = subprocess.Popen([sys.executable, "-m", "bench.instant_remote"],
                               stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{process.stdout.readline().strip()}"
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    asyncio.run(_serve())
