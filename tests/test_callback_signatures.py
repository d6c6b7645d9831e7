"""Completion callbacks a receiver can trust: Standard Webhooks signatures with the owner's
own secret, checked by a receiver on 127.0.0.1 that runs docs/callbacks.md's check (the
Standard Webhooks library, then callback_url, user_id, task_id), against the forgeries a
user can make: another owner's task naming your order, a callback replayed to another
receiver; and the deprecated headers still verifying meanwhile."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.factories import USER_A, USER_B
from tests.missing_tools import missing
from tests.remote_api import start_receiver
from tests.worker_harness import REPO, start_worker_process, wait_until, worker_settings
from worker.notify.completion_callbacks import CallbackSender, callback_client, verify_signature
from worker.notify.owner_secrets import OwnerSecrets
from worker.notify.signing import CallbackSigner

# The deployment's secret, in the form Standard Webhooks libraries take.
SHARED = "whsec_" + base64.b64encode(b"the deployment's shared secret!!").decode()


def documented_check() -> Callable[..., dict[str, Any]]:
    """``taskman_callback`` exactly as docs/callbacks.md shows it."""
    docs = (REPO / "docs" / "callbacks.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
              if "def taskman_callback" in block]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/callbacks.md", "exec"), namespace)
    return namespace["taskman_callback"]


@dataclass
class Verdict:
    path: str
    accepted: bool
    reason: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An app's callback endpoint on 127.0.0.1: 204 for what the documented check
    accepts, 401 (with the reason) for the rest. It waits for the tasks in ``task_ids``
    of ``owner``, on every path, each path a receiver URL of its own."""

    def __init__(self, secret: str, owner: str | None) -> None:
        self.secret, self.owner = secret, owner
        self.task_ids: set[str] = set()
        self.verdicts: list[Verdict] = []
        check = documented_check()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                try:
                    check(receiver.secret, receiver.url(self.path), receiver.owner,
                          receiver.task_ids, headers, body)
                    verdict = Verdict(self.path, True, "", headers, body)
                except WebhookVerificationError as exc:
                    verdict = Verdict(self.path, False, str(exc), headers, body)
                receiver.verdicts.append(verdict)
                self.send_response(204 if verdict.accepted else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def replay(self, verdict: Verdict, path: str) -> int:
        """POST a received callback again, byte for byte, to ``path``."""
        headers = {k: v for k, v in verdict.headers.items()
                   if k.lower() not in ("host", "content-length")}
        return httpx.post(self.url(path), content=verdict.body, headers=headers).status_code

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver_of_a(api) -> Iterator[Receiver]:
    """User A's receiver, verifying with A's own secret."""
    secret = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)["secret"]
    receiver = Receiver(secret, USER_A)
    yield receiver
    receiver.stop()


def users_task(api, user: str, callback_url: str, **args: Any) -> dict[str, Any]:
    """A task as a signed-in user creates it through PostgREST."""
    args = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in args.items()}
    return api.rpc("authenticated", "create_task", sub=user, callback_url=callback_url,
                   **args)


def report(api, task: dict[str, Any], result: dict[str, Any]) -> None:
    """The task's result, written by whoever holds its callback token."""
    api.rpc("anon", "update_task", task_id=task["task_id"], status="completed",
            result=json.dumps(result), callback_token=task["callback_token"])


def test_another_users_task_naming_your_order_is_rejected_by_your_receiver(
        api, database_url, workers, receiver_of_a) -> None:
    url = receiver_of_a.url("/orders/hook")
    genuine = users_task(api, USER_A, url, metadata={"order": "A-1001"})
    receiver_of_a.task_ids.add(genuine["task_id"])
    # B knows A's receiver URL and order number, and reports its own task's result.
    forged = users_task(api, USER_B, url, metadata={"order": "A-1001"})
    workers.append(start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SHARED))
    report(api, forged, {"order": "A-1001", "paid": True})
    report(api, genuine, {"order": "A-1001", "paid": False})
    wait_until(lambda: len(receiver_of_a.verdicts) == 2)

    by_task = {json.loads(v.body)["task_id"]: v for v in receiver_of_a.verdicts}
    assert by_task[genuine["task_id"]].accepted, by_task[genuine["task_id"]].reason
    rejected = by_task[forged["task_id"]]
    assert not rejected.accepted and "signature" in rejected.reason.lower()
    # B has no secret of its own: its callback is signed with the deployment's. A receiver
    # of A's that verified with that one still turns it away, on the owner it names.
    with pytest.raises(WebhookVerificationError, match="another owner"):
        documented_check()(SHARED, url, USER_A, {forged["task_id"]}, rejected.headers,
                           rejected.body)
    # ... and, were B's user id expected, on the task: A never created it.
    with pytest.raises(WebhookVerificationError, match="not a task"):
        documented_check()(SHARED, url, USER_B, receiver_of_a.task_ids, rejected.headers,
                           rejected.body)
    # A's callback carries no signature with the deployment's secret.
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(SHARED).verify(by_task[genuine["task_id"]].body,
                               by_task[genuine["task_id"]].headers)


def test_a_callback_replayed_to_another_receiver_is_rejected(
        api, database_url, workers, receiver_of_a) -> None:
    task = users_task(api, USER_A, receiver_of_a.url("/orders/hook"))
    receiver_of_a.task_ids.add(task["task_id"])
    workers.append(start_worker_process(database_url))
    report(api, task, {"paid": True})
    [delivered] = wait_until(lambda: receiver_of_a.verdicts)
    assert delivered.accepted, delivered.reason
    assert delivered.headers["webhook-id"] == f"msg_{delivered.headers['X-Taskman-Delivery']}"

    # Within the 5 minutes, to another of A's receivers (same secret, same owner).
    assert receiver_of_a.replay(delivered, "/invoices/hook") == 401
    assert "another receiver" in receiver_of_a.verdicts[-1].reason
    # The same bytes to the receiver they were signed for still verify (the app drops the
    # duplicate on webhook-id): the rejection above is the URL's doing.
    assert receiver_of_a.replay(delivered, "/orders/hook") == 204


def test_the_deprecated_headers_still_verify_with_the_deployments_secret(
        api, database_url, workers, receiver_of_a) -> None:
    task = users_task(api, USER_A, receiver_of_a.url("/orders/hook"))
    receiver_of_a.task_ids.add(task["task_id"])
    workers.append(start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SHARED))
    report(api, task, {"paid": True})
    [delivered] = wait_until(lambda: receiver_of_a.verdicts)
    assert delivered.accepted
    headers = delivered.headers
    assert verify_signature(SHARED, headers["X-Taskman-Timestamp"], delivered.body,
                            headers["X-Taskman-Signature"])
    assert headers["X-Taskman-Timestamp"] == headers["webhook-timestamp"]


def sign_once(database_url: str, payload: dict[str, Any], *, legacy: bool = True,
              refresh_seconds: float = 0.0) -> dict[str, str]:
    """The headers one callback of ``payload`` goes out with, from a sender in this
    process (owners' secrets read from the database as the worker reads them)."""
    receiver = start_receiver()
    owners = OwnerSecrets(database_url, refresh_seconds=refresh_seconds)

    async def deliver() -> None:
        signer = CallbackSigner(SHARED, owners, legacy=legacy)
        async with callback_client(worker_settings(database_url)) as http:
            sender = CallbackSender(http, None, signer=signer)
            delivery = await sender.deliver(7, payload | {"callback_url": receiver.url("/h")})
            assert delivery.outcome == "delivered", delivery
        await owners.aclose()

    try:
        asyncio.run(deliver())
        [hit] = receiver.hits()
    finally:
        receiver.stop()
    return hit.headers | {"body": hit.body.decode()}


def verifies(secret: str, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(headers["body"].encode(), headers)
    except WebhookVerificationError:
        return False
    return True


def test_a_rotation_signs_with_both_secrets_for_its_grace_then_the_new_one_alone(api,
                                                                                database_url):
    payload = {"task_id": "t-1", "user_id": USER_A, "status": "completed"}
    first = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)["secret"]
    signed = sign_once(database_url, payload)
    assert verifies(first, signed) and not verifies(SHARED, signed)

    second = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A,
                     keep_previous_seconds=3600)
    assert second["secret"] != first and second["previous_valid_until"] is not None
    signed = sign_once(database_url, payload)
    assert len(signed["webhook-signature"].split(" ")) == 2
    assert verifies(first, signed) and verifies(second["secret"], signed)

    third = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A,
                    keep_previous_seconds=0)
    signed = sign_once(database_url, payload)
    assert verifies(third["secret"], signed)
    assert not verifies(first, signed) and not verifies(second["secret"], signed)
    # Owners without a secret of their own, and the service's tasks: the deployment's.
    assert verifies(SHARED, sign_once(database_url, payload | {"user_id": USER_B}))
    assert verifies(SHARED, sign_once(database_url, payload | {"user_id": None}))


def test_a_running_worker_signs_with_a_rotated_secret_within_its_refresh(api, database_url):
    payload = {"task_id": "t-2", "user_id": USER_A, "status": "completed"}
    receiver = start_receiver()
    owners = OwnerSecrets(database_url, refresh_seconds=0.3)
    first = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)["secret"]

    async def deliver_twice() -> tuple[str, list[str]]:
        async with callback_client(worker_settings(database_url)) as http:
            sender = CallbackSender(http, None, signer=CallbackSigner(SHARED, owners))
            url = {"callback_url": receiver.url("/h")}
            await sender.deliver(1, payload | url)
            rotated = await asyncio.to_thread(
                api.rpc, "authenticated", "rotate_callback_secret", sub=USER_A,
                keep_previous_seconds=0)
            await sender.deliver(2, payload | url)  # within the refresh: still the first
            await asyncio.sleep(0.4)
            await sender.deliver(3, payload | url)
        await owners.aclose()
        return rotated["secret"], [h.headers | {"body": h.body.decode()}
                                   for h in receiver.hits()]

    try:
        second, (one, two, three) = asyncio.run(deliver_twice())
    finally:
        receiver.stop()
    assert verifies(first, one) and verifies(first, two)
    assert verifies(second, three) and not verifies(first, three)


def test_without_the_deprecated_headers_only_standard_webhooks_ones_go_out(api, database_url):
    api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)
    signed = sign_once(database_url, {"task_id": "t-3", "user_id": USER_A}, legacy=False)
    assert "X-Taskman-Signature" not in signed and "X-Taskman-Timestamp" not in signed
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(signed)


def test_secrets_are_the_owners_alone(api, conn) -> None:
    a = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)
    b = api.rpc("authenticated", "rotate_callback_secret", sub=USER_B)
    assert a["secret"] != b["secret"]
    for created in (a, b):
        assert created["secret"].startswith("whsec_")
        assert len(base64.b64decode(created["secret"][len("whsec_"):])) == 32
    for role in ("authenticated", "anon"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), api.request(role, USER_B) as cur:
            cur.execute("select secret from taskman_private.callback_secrets")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api.rpc("anon", "rotate_callback_secret")
    # The service has no owner, so no secret: its callbacks use TASKMAN_CALLBACK_SECRET.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TASKMAN_CALLBACK_SECRET"):
        api.rpc("service_role", "rotate_callback_secret")
    stored = conn.execute("select user_id::text, secret from taskman_private.callback_secrets"
                          " order by user_id").fetchall()
    assert stored == [{"user_id": USER_A, "secret": a["secret"]},
                      {"user_id": USER_B, "secret": b["secret"]}]


@pytest.mark.parametrize("keep", [-1, 604_801, None])
def test_a_bad_grace_is_refused_and_changes_nothing(api, conn, keep) -> None:
    kept = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)["secret"]
    with pytest.raises(psycopg.Error) as refused:
        api.rpc("authenticated", "rotate_callback_secret", sub=USER_A,
                keep_previous_seconds=keep)
    assert refused.value.sqlstate == "22023"
    assert "keep_previous_seconds" in refused.value.diag.message_primary
    assert conn.execute("select secret, previous_secret from taskman_private.callback_secrets"
                        ).fetchall() == [{"secret": kept, "previous_secret": None}]


def test_a_callback_whose_owner_secrets_cannot_be_read_waits_instead_of_going_out_wrongly(
        database_url) -> None:
    receiver = start_receiver()
    owners = OwnerSecrets("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")

    async def deliver() -> Any:
        async with callback_client(worker_settings(database_url)) as http:
            sender = CallbackSender(http, None, signer=CallbackSigner(SHARED, owners))
            return await sender.deliver(9, {"task_id": "t", "user_id": USER_A,
                                            "callback_url": receiver.url("/h")})

    try:
        delivery = asyncio.run(deliver())
        assert receiver.hits() == []
    finally:
        receiver.stop()
    assert (delivery.outcome, delivery.reason) == ("failed", "signing_secrets_unavailable")


def test_the_edge_gives_a_user_their_secret_once_and_the_service_none(database_url) -> None:
    from tests.edge.conftest import API_KEY, serve_edge, user_token

    with serve_edge(database_url) as edge:
        with edge.client(user_token(USER_A)) as http:
            first = http.post("/callback-secret")
            second = http.post("/callback-secret", params={"keep_previous_seconds": 0})
            bad = http.post("/callback-secret", params={"keep_previous_seconds": -5})
        with edge.client(API_KEY) as http:
            service = http.post("/callback-secret")
    assert first.status_code == 200, first.text
    assert first.json()["secret"].startswith("whsec_")
    assert second.json()["secret"] != first.json()["secret"]
    assert second.json()["previous_valid_until"] is None
    assert bad.status_code == 422 and "keep_previous_seconds" in bad.text
    assert service.status_code == 403, service.text
    assert set(first.json()) == {"secret", "rotated_at", "previous_valid_until"}


NODE_RUNNER = r"""
const fs = require("fs");
const [code, input] = [fs.readFileSync(process.argv[2], "utf8"),
                       JSON.parse(fs.readFileSync(process.argv[3], "utf8"))];
const taskmanCallback = new Function("require", code + "; return taskmanCallback;")(require);
try {
  const task = taskmanCallback(input.secret, input.url, input.user, new Set(input.tasks),
                               input.headers, Buffer.from(input.body, "base64"));
  console.log("ACCEPTED " + task.task_id);
} catch (err) { console.log("REJECTED " + err.message); }
"""


def test_the_documented_nodejs_check_accepts_and_rejects_like_the_python_one(tmp_path) -> None:
    if shutil.which("node") is None:
        missing("Node.js is not installed (it runs docs/callbacks.md's Node.js check)")
    docs = (REPO / "docs" / "callbacks.md").read_text()
    [code] = [block for block in re.findall(r"```js\n(.*?)```", docs, re.DOTALL)
              if "function taskmanCallback" in block]
    (tmp_path / "check.js").write_text(code)
    (tmp_path / "run.js").write_text(NODE_RUNNER)
    url = "https://app.example.com/hooks/taskman"
    body = json.dumps({"task_id": "t-9", "user_id": USER_A, "callback_url": url}).encode()
    signed = asyncio.run(CallbackSigner(SHARED).headers(12, USER_A, int(time.time()), body))

    def run(secret: str = SHARED, receiver: str = url, user: str = USER_A,
            tasks: tuple[str, ...] = ("t-9",), headers: dict[str, str] = signed) -> str:
        (tmp_path / "input.json").write_text(json.dumps({
            "secret": secret, "url": receiver, "user": user, "tasks": tasks,
            "headers": headers, "body": base64.b64encode(body).decode()}))
        done = subprocess.run(["node", str(tmp_path / "run.js"), str(tmp_path / "check.js"),
                               str(tmp_path / "input.json")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run() == "ACCEPTED t-9"
    assert documented_check()(SHARED, url, USER_A, {"t-9"}, signed, body)["task_id"] == "t-9"
    assert run(secret="whsec_" + base64.b64encode(b"x" * 32).decode()).startswith("REJECTED")
    assert "another receiver" in run(receiver=url + "/other")
    assert "another owner" in run(user=USER_B)
    assert "not a task" in run(tasks=("t-8",))
    old = signed | {"webhook-timestamp": str(int(time.time()) - 600)}
    assert run(headers=old).startswith("REJECTED")
