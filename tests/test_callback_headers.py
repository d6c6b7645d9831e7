"""callback_headers: extra headers a receiver's own auth needs, sent with the completion
callback, kept where only the service reads them, and never in place of Taskman's own."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import psycopg
import pytest
from standardwebhooks import Webhook

from tests.edge.conftest import API_KEY, serve_edge
from tests.factories import create_task
from tests.remote_api import start_receiver
from tests.worker_harness import REPO, start_worker_process, wait_until
from worker.notify.completion_callbacks import verify_signature

SECRET = "callback-headers-secret"
USER = "aaaaaaaa-0000-4000-8000-0000000000c1"


def test_the_receiver_gets_the_tasks_callback_headers_beside_a_valid_signature(
        conn, database_url, workers) -> None:
    receiver = start_receiver()
    try:
        task_id = create_task(conn, poll_url=None, callback_url=receiver.url("/resume/1"),
                              callback_headers={"Authorization": "Bearer n8n-header-auth",
                                                "X-Tenant": "acme"})["task_id"]
        plain = create_task(conn, poll_url=None, callback_url=receiver.url("/resume/2"))
        workers.append(start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SECRET))
        conn.execute("select taskman.update_task(%s, 'completed'), taskman.update_task(%s,"
                     " 'completed')", (task_id, plain["task_id"]))
        [hit] = wait_until(lambda: receiver.hits("/resume/1"))
        [other] = wait_until(lambda: receiver.hits("/resume/2"))
    finally:
        receiver.stop()
    assert hit.headers["Authorization"] == "Bearer n8n-header-auth"
    assert hit.headers["X-Tenant"] == "acme"
    assert verify_signature(SECRET, hit.headers["X-Taskman-Timestamp"], hit.body,
                            hit.headers["X-Taskman-Signature"])
    assert "n8n-header-auth" not in hit.body.decode()  # headers only, never in the body
    assert "Authorization" not in other.headers  # another task's headers stay its own


@pytest.mark.parametrize("name", ["X-Taskman-Signature", "x-taskman-delivery", "Content-Type",
                                  "Host", "Content-Length", "X-Taskman-Timestamp"])
def test_taskmans_own_headers_cannot_be_overridden(conn, name) -> None:
    before = conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"]
    with pytest.raises(psycopg.Error) as refused:
        create_task(conn, callback_url="https://hooks.example.com/x",
                    callback_headers={name: "forged"})
    assert refused.value.sqlstate == "22023"
    assert "callback_headers" in refused.value.diag.message_primary
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == before


@pytest.mark.parametrize("headers", [{"X-A": "line\nbreak"}, {"Bad Name": "x"}, {"X-A": 1},
                                     ["not", "an", "object"]])
def test_callback_headers_follow_the_poll_headers_rules(conn, headers) -> None:
    with pytest.raises(psycopg.Error) as refused:
        create_task(conn, callback_url="https://hooks.example.com/x", callback_headers=headers)
    assert refused.value.sqlstate == "22023"
    assert "callback_headers" in refused.value.diag.message_primary


def test_users_can_never_read_callback_headers_back(conn, api) -> None:
    created = api.rpc("authenticated", "create_task", sub=USER,
                      callback_url="https://hooks.example.com/x",
                      callback_headers='{"Authorization": "Bearer users-own-secret"}')
    assert "users-own-secret" not in str(created) and "callback_headers" not in created
    with api.request("authenticated", USER) as cur:
        cur.execute("insert into taskman.tasks (callback_url, callback_headers) values"
                    " ('https://hooks.example.com/y', '{\"X-Key\": \"inserted-secret\"}')"
                    " returning to_jsonb(tasks.*) as row")
        inserted = cur.fetchone()["row"]
        cur.execute("select to_jsonb(t) as row, taskman.task_json(t) as json"
                    " from taskman.tasks t")
        seen = str(cur.fetchall())
    assert inserted["callback_headers"] is None
    assert "users-own-secret" not in seen and "inserted-secret" not in seen
    for role in ("authenticated", "anon"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), api.request(role, USER) as cur:
            cur.execute("select callback_headers from taskman_private.task_private")
    stored = conn.execute("select callback_headers from taskman_private.task_private"
                          " where task_id = %s", (created["task_id"],)).fetchone()
    assert stored["callback_headers"] == {"Authorization": "Bearer users-own-secret"}


def test_callback_headers_through_the_edge_and_the_cli(conn, database_url) -> None:
    with serve_edge(database_url) as edge, edge.client(API_KEY) as http:
        created = http.post("/tasks", json={"callback_url": "https://hooks.example.com/z",
                                            "callback_headers": {"X-Key": "edge-secret"}})
        assert created.status_code == 201, created.text
        assert "edge-secret" not in created.text
        refused = http.post("/tasks", json={"callback_url": "https://hooks.example.com/z",
                                            "callback_headers": {"Host": "evil.example.com"}})
        assert refused.status_code == 422 and "callback_headers" in refused.text
    env = {**os.environ, "DATABASE_URL": database_url}
    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "create", "--callback-url",
         "https://hooks.example.com/c", "--callback-header", "X-Key: cli-secret", "--json"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "cli-secret" not in cli.stdout
    rows = conn.execute("select callback_headers from taskman_private.task_private"
                        " where callback_headers is not null").fetchall()
    assert {"X-Key": "cli-secret"} in [r["callback_headers"] for r in rows]
    assert {"X-Key": "edge-secret"} in [r["callback_headers"] for r in rows]


def test_stored_headers_that_slipped_past_the_checks_still_cannot_forge_a_signature(
        conn, database_url, workers) -> None:
    receiver = start_receiver()
    try:
        task_id = create_task(conn, poll_url=None, callback_url=receiver.url("/r"))["task_id"]
        # As an operator's hand-edit could store them: the sender keeps Taskman's own.
        conn.execute("update taskman_private.task_private set callback_headers = %s"
                     " where task_id = %s",
                     ('{"X-Taskman-Signature": "sha256=forged", "content-type": "text/plain",'
                      ' "Webhook-Signature": "v1,forged", "webhook-id": "msg_0",'
                      ' "X-Extra": "kept"}', task_id))
        workers.append(start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SECRET))
        conn.execute("select taskman.update_task(%s, 'completed')", (task_id,))
        [hit] = wait_until(lambda: receiver.hits("/r"))
    finally:
        receiver.stop()
    assert hit.headers["X-Extra"] == "kept" and hit.headers["Content-Type"] == "application/json"
    assert verify_signature(SECRET, hit.headers["X-Taskman-Timestamp"], hit.body,
                            hit.headers["X-Taskman-Signature"])
    assert hit.headers["webhook-id"] == f"msg_{hit.headers['X-Taskman-Delivery']}"
    assert "forged" not in hit.headers["webhook-signature"]
    # A secret without whsec_ is keyed as its UTF-8 bytes: the library takes it in base64.
    Webhook("whsec_" + base64.b64encode(SECRET.encode()).decode()).verify(hit.body, hit.headers)
