"""A live edge per test module: uvicorn in a thread, on its own migrated database.

Tests in a module share the server and its database, so each builds its data with
fresh user ids and asserts on its own tasks only.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import uvicorn
from psycopg.rows import dict_row

from tests.conftest import cloned_database
from worker.config import Settings
from worker.edge.app import create_app

API_KEY = "test-api-key"
JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def user_token(sub: str, *, role: str = "authenticated", secret: str = JWT_SECRET,
               expires_in: int = 3600, **claims: Any) -> str:
    """A Supabase-style access token for ``sub``."""
    payload = {"sub": sub, "role": role, "aud": "authenticated",
               "exp": int(time.time()) + expires_in, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


@dataclass
class Edge:
    url: str
    database_url: str

    def client(self, token: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@dataclass
class User:
    """A signed-in user with a client that sends their JWT."""

    id: str
    token: str
    http: httpx.Client


@pytest.fixture(scope="module")
def edge_database_url(server_url: str) -> Iterator[str]:
    with cloned_database(server_url, "edge") as url:
        yield url


@contextmanager
def serve_edge(database_url: str, **overrides: Any) -> Iterator[Edge]:
    """A live edge over ``database_url`` with the test settings, changed by ``overrides``."""
    values: dict[str, Any] = {
        "TASKMAN_API_KEYS": f"other-key,{API_KEY}",
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "TASKMAN_EDGE_MAX_BODY_BYTES": 65_536,
        **overrides,
    }
    settings = Settings(_env_file=None, **values)
    app = create_app(settings, database_url, keepalive_seconds=0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the edge did not start"
        time.sleep(0.02)
    try:
        yield Edge(f"http://127.0.0.1:{sock.getsockname()[1]}", database_url)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def edge(edge_database_url: str) -> Iterator[Edge]:
    with serve_edge(edge_database_url) as server:
        yield server


@pytest.fixture
def service(edge: Edge) -> Iterator[httpx.Client]:
    """A client holding an API key: the service."""
    with edge.client() as client:
        yield client


def _user(edge: Edge) -> User:
    sub = str(uuid.uuid4())
    token = user_token(sub)
    return User(sub, token, edge.client(token))


@pytest.fixture
def alice(edge: Edge) -> Iterator[User]:
    user = _user(edge)
    yield user
    user.http.close()


@pytest.fixture
def bob(edge: Edge) -> Iterator[User]:
    user = _user(edge)
    yield user
    user.http.close()


@pytest.fixture
def db(edge: Edge) -> Iterator[psycopg.Connection]:
    """A superuser connection to the edge's database, to look behind the API."""
    with psycopg.connect(edge.database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn
