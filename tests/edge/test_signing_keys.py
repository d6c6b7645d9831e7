"""Supabase's JWT signing keys: user tokens signed with ES256 or RS256, verified against the
project's JWKS, which a local HTTP server plays here (as Supabase Auth would serve it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from tests.edge.conftest import Edge, serve_edge, user_token
from worker.config import Settings

JWKS_PATH = "/auth/v1/.well-known/jwks.json"
# The module's edge refreshes the JWKS at most this often (the default is 30 s).
REFRESH_INTERVAL = 0.3


@dataclass
class SigningKey:
    """One of a project's signing keys: the private half signs, the public half is published."""

    kid: str
    algorithm: str
    private: Any

    @classmethod
    def generate(cls, kid: str, algorithm: str) -> SigningKey:
        if algorithm == "ES256":
            return cls(kid, algorithm, ec.generate_private_key(ec.SECP256R1()))
        return cls(kid, algorithm, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, Any]:
        """The public key as Supabase Auth publishes it."""
        kind = ECAlgorithm if self.algorithm == "ES256" else RSAAlgorithm
        public = kind.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: dict[str, Any], *, kid: str | None = None,
             algorithm: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=algorithm or self.algorithm,
                          headers={"kid": kid or self.kid})


class JwksServer:
    """Supabase Auth's JWKS endpoint on 127.0.0.1: publishes ``keys``, counts fetches,
    and answers ``delay`` seconds late when asked to."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.fetches: list[float] = []  # monotonic time of each fetch
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                server.fetches.append(time.monotonic())
                time.sleep(server.delay)
                body = json.dumps({"keys": [key.jwk() for key in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on a slow answer

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.issuer = f"{self.url}/auth/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take the endpoint down: connections are refused from now on."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait_until_refresh_allowed(self, interval: float = REFRESH_INTERVAL) -> None:
        """Sleep until ``interval`` has passed since the last fetch."""
        if self.fetches:
            time.sleep(max(0.0, self.fetches[-1] + interval + 0.05 - time.monotonic()))


ES = SigningKey.generate("es-key-1", "ES256")
RS = SigningKey.generate("rs-key-1", "RS256")


def claims(issuer: str, sub: str | None = None, *, expires_in: int = 3600,
           **changes: Any) -> dict[str, Any]:
    """The claims of a Supabase user's access token; a None in ``changes`` drops a claim."""
    now = int(time.time())
    payload = {"iss": issuer, "sub": sub or str(uuid.uuid4()), "aud": "authenticated",
               "exp": now + expires_in, "iat": now, "role": "authenticated",
               "email": "someone@example.com", "session_id": str(uuid.uuid4()),
               "is_anonymous": False, **changes}
    return {name: value for name, value in payload.items() if value is not None}


def _part(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_part(json.dumps(header).encode())}.{_part(json.dumps(payload).encode())}"


def hs256_signed_with(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """An HS256 token keyed with ``secret`` (PyJWT rightly refuses to make one with a public
    key, so it is put together here, as an attacker would)."""
    signing_input = _signing_input({"alg": "HS256", "typ": "JWT", "kid": kid}, payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_part(signature)}"


def odd_header(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token with any header at all, and a signature of nothing."""
    return f"{_signing_input(header, payload)}.{_part(b'signature')}"


def create(client: httpx.Client) -> dict[str, Any]:
    response = client.post("/tasks", json={"poll_url": "https://api.example.com/s/1"})
    assert response.status_code == 201, response.text
    return response.json()


def assert_refused(edge: Edge, token: str, status: int = 401) -> dict[str, Any]:
    with edge.client(token) as client:
        response = client.get("/tasks")
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    server = JwksServer(ES, RS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def project_edge(edge_database_url: str, jwks: JwksServer) -> Iterator[Edge]:
    """An edge with both SUPABASE_URL and the legacy SUPABASE_JWT_SECRET set."""
    with serve_edge(edge_database_url, SUPABASE_URL=jwks.url,
                    TASKMAN_JWKS_REFRESH_INTERVAL=REFRESH_INTERVAL) as server:
        yield server


def test_users_signed_with_es256_and_rs256_act_as_themselves(project_edge, jwks) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    with project_edge.client(ES.sign(claims(jwks.issuer, alice))) as as_alice, \
            project_edge.client(RS.sign(claims(jwks.issuer, bob))) as as_bob:
        hers, his = create(as_alice), create(as_bob)

        assert (hers["user_id"], his["user_id"]) == (alice, bob)
        assert [t["task_id"] for t in as_alice.get("/tasks").json()["tasks"]] == [hers["task_id"]]
        assert [t["task_id"] for t in as_bob.get("/tasks").json()["tasks"]] == [his["task_id"]]
        assert as_bob.get(f"/tasks/{hers['task_id']}").status_code == 404
        assert as_alice.get(f"/tasks/{his['task_id']}").status_code == 404
        assert as_alice.get(f"/tasks/{hers['task_id']}").status_code == 200


def test_legacy_hs256_tokens_and_api_keys_work_beside_signing_keys(project_edge) -> None:
    user = str(uuid.uuid4())
    with project_edge.client(user_token(user)) as legacy, project_edge.client() as service:
        task = create(legacy)

        assert task["user_id"] == user
        assert service.get(f"/tasks/{task['task_id']}").status_code == 200


def test_a_key_published_after_the_edge_started_is_picked_up(project_edge, jwks) -> None:
    with project_edge.client(ES.sign(claims(jwks.issuer))) as client:
        assert client.get("/tasks").status_code == 200  # the edge holds the keys of the day
    rotated = SigningKey.generate(f"es-key-{uuid.uuid4().hex[:6]}", "ES256")
    user = str(uuid.uuid4())
    token = rotated.sign(claims(jwks.issuer, user))
    assert_refused(project_edge, token)  # not published yet

    jwks.keys.append(rotated)
    jwks.wait_until_refresh_allowed()

    with project_edge.client(token) as client:
        assert create(client)["user_id"] == user


def _forgeries() -> dict[str, Callable[[str], str]]:
    intruder = SigningKey.generate(ES.kid, "ES256")  # claims a published kid, other private key
    stranger = SigningKey.generate("es-key-never-published", "ES256")
    return {
        "unknown-key": lambda iss: stranger.sign(claims(iss)),
        "wrong-signature": lambda iss: intruder.sign(claims(iss)),
        "no-kid": lambda iss: jwt.encode(claims(iss), ES.private, algorithm="ES256"),
        "alg-none": lambda iss: jwt.encode(claims(iss), None, algorithm="none",
                                           headers={"kid": ES.kid}),
        "hs256-keyed-with-rsa-public-key": lambda iss: hs256_signed_with(
            RS.public_pem(), claims(iss), RS.kid),
        "hs256-keyed-with-ec-public-key": lambda iss: hs256_signed_with(
            ES.public_pem(), claims(iss), ES.kid),
        "hs256-keyed-with-jwk-json": lambda iss: hs256_signed_with(
            json.dumps(RS.jwk()).encode(), claims(iss), RS.kid),
        "alg-not-a-string": lambda iss: odd_header({"alg": ["ES256"], "kid": ES.kid},
                                                   claims(iss)),
        "kid-not-a-string": lambda iss: odd_header({"alg": "ES256", "kid": 1}, claims(iss)),
        "rs256-under-the-es256-kid": lambda iss: RS.sign(claims(iss), kid=ES.kid),
        "es256-under-the-rs256-kid": lambda iss: ES.sign(claims(iss), kid=RS.kid),
        "ps256-with-the-rsa-key": lambda iss: RS.sign(claims(iss), algorithm="PS256"),
        "expired": lambda iss: ES.sign(claims(iss, expires_in=-120)),
        "wrong-issuer": lambda iss: ES.sign(claims("https://other.supabase.co/auth/v1")),
        "issuer-of-another-path": lambda iss: ES.sign(claims(iss.removesuffix("/auth/v1"))),
        "no-issuer": lambda iss: ES.sign(claims(iss, iss=None)),
        "wrong-audience": lambda iss: RS.sign(claims(iss, aud="someone-else")),
        "no-expiry": lambda iss: ES.sign(claims(iss, exp=None)),
    }


FORGERIES = _forgeries()


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_forged_tokens_are_refused(project_edge, jwks, forgery) -> None:
    error = assert_refused(project_edge, forgery(jwks.issuer))

    assert error["code"] == "unauthorized"


def test_forged_key_ids_do_not_make_the_edge_hammer_auth(edge_database_url) -> None:
    server = JwksServer(ES, RS)
    try:
        with serve_edge(edge_database_url, SUPABASE_URL=server.url,
                        TASKMAN_JWKS_REFRESH_INTERVAL=60) as edge:
            forged = [SigningKey(f"forged-{n}", "ES256", ES.private).sign(claims(server.issuer))
                      for n in range(40)]
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda t: assert_refused(edge, t)["code"], forged))
            with edge.client(RS.sign(claims(server.issuer))) as genuine:
                answer = genuine.get("/tasks")

        assert statuses == ["unauthorized"] * 40
        assert answer.status_code == 200
        assert len(server.fetches) == 1
    finally:
        server.stop()


def test_auth_unreachable_and_no_key_held_is_503_not_401(edge_database_url) -> None:
    server = JwksServer(ES)
    server.stop()
    with serve_edge(edge_database_url, SUPABASE_URL=server.url) as edge:
        token = ES.sign(claims(server.issuer))
        with edge.client(token) as client:
            answers = [client.get("/tasks"), client.get("/events")]
        with edge.client(user_token(str(uuid.uuid4()))) as legacy, edge.client() as service:
            others = [legacy.get("/tasks").status_code, service.get("/tasks").status_code]

    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "auth_unavailable"
        assert "signing keys" in answer.json()["error"]["message"]
        assert int(answer.headers["Retry-After"]) >= 1
    assert others == [200, 200]


def test_keys_held_keep_working_while_auth_is_down(edge_database_url) -> None:
    server = JwksServer(ES, RS)
    with serve_edge(edge_database_url, SUPABASE_URL=server.url, TASKMAN_JWKS_MAX_AGE=0.5,
                    TASKMAN_JWKS_REFRESH_INTERVAL=0.2) as edge:
        with edge.client(ES.sign(claims(server.issuer))) as client:
            assert client.get("/tasks").status_code == 200
        server.stop()
        time.sleep(0.6)  # the keys held are now due for a refresh, which fails

        with edge.client(ES.sign(claims(server.issuer))) as client:
            held = client.get("/tasks")
        with edge.client(RS.sign(claims(server.issuer))) as client:
            also_held = client.get("/tasks")
        unknown = SigningKey.generate("es-key-2", "ES256").sign(claims(server.issuer))

        assert (held.status_code, also_held.status_code) == (200, 200)
        assert assert_refused(edge, unknown, 503)["code"] == "auth_unavailable"


def test_a_slow_jwks_is_cut_short_and_stalls_no_other_request(edge_database_url) -> None:
    server = JwksServer(ES)
    server.delay = 10
    try:
        with serve_edge(edge_database_url, SUPABASE_URL=server.url,
                        TASKMAN_JWKS_TIMEOUT=2) as edge:
            slow: dict[str, Any] = {}

            def stream() -> None:
                started = time.monotonic()
                with edge.client(ES.sign(claims(server.issuer))) as client:
                    slow["status"] = client.get("/events").status_code
                slow["seconds"] = time.monotonic() - started

            waiting = threading.Thread(target=stream)
            waiting.start()
            deadline = time.monotonic() + 5
            while not server.fetches:
                assert time.monotonic() < deadline, "the edge never asked for the JWKS"
                time.sleep(0.01)
            with edge.client() as service:
                meanwhile = service.get("/tasks").status_code
                still_waiting = waiting.is_alive()
            waiting.join(15)

        assert (meanwhile, still_waiting) == (200, True)
        assert slow["status"] == 503
        assert slow["seconds"] < 6
    finally:
        server.stop()


def test_jwks_only_refuses_hs256_even_keyed_with_the_public_key(edge_database_url, jwks) -> None:
    with serve_edge(edge_database_url, SUPABASE_URL=jwks.url, SUPABASE_JWT_SECRET=None) as edge:
        with edge.client(ES.sign(claims(jwks.issuer))) as client:
            assert client.get("/tasks").status_code == 200
        assert_refused(edge, user_token(str(uuid.uuid4())))
        assert_refused(edge, hs256_signed_with(ES.public_pem(), claims(jwks.issuer), ES.kid))


def test_without_supabase_url_signing_key_tokens_are_refused(edge, jwks) -> None:
    fetches = len(jwks.fetches)

    assert_refused(edge, ES.sign(claims(jwks.issuer)))
    assert len(jwks.fetches) == fetches


@pytest.mark.parametrize(("given", "kept"), [("https://abc.supabase.co/", "https://abc.supabase.co"),
                                             ("", None)])
def test_supabase_url_is_the_project_url(given, kept) -> None:
    assert Settings(_env_file=None, SUPABASE_URL=given).supabase_url == kept


@pytest.mark.parametrize("given", ["abc.supabase.co", "ftp://abc.supabase.co",
                                   "https://abc.supabase.co/auth/v1"])
def test_a_supabase_url_that_is_not_a_project_url_stops_the_start(given) -> None:
    with pytest.raises(ValidationError, match="SUPABASE_URL"):
        Settings(_env_file=None, SUPABASE_URL=given)


@pytest.mark.parametrize("key", ["sb_publishable_7bM4nGf1q2W0x9YtZkLrPQ_3hVxKcE1",
                                 "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"])
def test_supabase_api_keys_are_not_edge_credentials(project_edge, key) -> None:
    assert assert_refused(project_edge, key)["code"] == "unauthorized"
