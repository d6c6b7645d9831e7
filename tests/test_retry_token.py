"""A retry gives the task a new callback token and the old one stops working, for a task
whose submit hands the remote `{callback_url}` too: that task is submitted again with the
new token's URL. Against a real edge, worker and fake remote on 127.0.0.1."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.edge.conftest import serve_edge
from tests.factories import USER_A, create_task, task_row
from tests.remote_api import Reply
from tests.test_submit import finished, posts
from tests.worker_harness import running_worker, wait_until


def _token_in(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def _report(api, task_id: str, token: str, status: str = "completed") -> dict:
    return api.rpc("anon", "update_task", task_id=task_id, status=status, callback_token=token)


def test_a_retried_callback_task_is_submitted_again_with_a_new_token_and_the_old_fails(
        conn, database_url, remote) -> None:
    url = remote.script("/renders", Reply(202, json={"accepted": True}))
    with serve_edge(database_url) as edge:
        created = create_task(conn, poll_url=None, submit_url=url,
                              submit_body={"notify": "{callback_url}"})
        task_id = created["task_id"]
        with running_worker(database_url, TASKMAN_PUBLIC_URL=edge.url):
            wait_until(lambda: task_row(conn, task_id)["submitted_at"])
            [first] = posts(remote, "/renders")
            old_url = first.json()["notify"]
            old = _token_in(old_url)
            assert old == created["callback_token"]
            assert httpx.post(old_url, json={"status": "failed"}).status_code == 200
            assert finished(conn, task_id)["status"] == "failed"

            retried = conn.execute("select taskman.retry_task(%s) as r",
                                   (task_id,)).fetchone()["r"]
            new = retried["callback_token"]
            assert new != old
            wait_until(lambda: len(posts(remote, "/renders")) == 2)
            second = posts(remote, "/renders")[1]
            new_url = second.json()["notify"]
            assert _token_in(new_url) == new
            keys = [h.headers["Idempotency-Key"] for h in (first, second)]
            assert keys == [f"{task_id}.{hashlib.sha256(t.encode()).hexdigest()[:16]}"
                            for t in (old, new)]
            wait_until(lambda: task_row(conn, task_id)["submitted_at"])

            # The URL the first remote job holds opens nothing any more, by query or header.
            stale = httpx.post(old_url, json={"status": "completed", "result": {"forged": 1}})
            assert stale.status_code == 403
            by_header = httpx.post(f"{edge.url}/callbacks/{task_id}", json={"status": "failed"},
                                   headers={"X-Taskman-Callback-Token": old})
            assert by_header.status_code == 403
            assert task_row(conn, task_id)["status"] == "in_progress"

            assert httpx.post(new_url, json={"status": "completed",
                                             "result": {"n": 2}}).status_code == 200
            assert finished(conn, task_id)["result"] == {"n": 2}
    assert len(posts(remote, "/renders")) == 2


def test_retry_through_postgrest_rotates_the_token_of_a_submitted_callback_task(
        conn, api) -> None:
    created = api.rpc("authenticated", "create_task", USER_A,
                      submit_url="https://api.example.com/jobs",
                      submit_body=Jsonb({"notify": "{callback_url}"}))
    task_id, old = created["task_id"], created["callback_token"]
    # As the worker records an accepted submit with a handle, whose job then failed.
    conn.execute("update taskman.tasks set submitted_at = now(), status = 'failed',"
                 " poll_url = 'https://api.example.com/jobs/1', error_code = 'remote_failed'"
                 " where task_id = %s", (task_id,))

    retried = api.rpc("authenticated", "retry_task", USER_A, task_id=task_id)
    new = retried["callback_token"]
    assert new != old
    row = task_row(conn, task_id)
    assert (row["status"], row["submitted_at"], row["poll_url"]) == ("pending", None, None)
    kept = conn.execute("select submit_callback_token, callback_token_hash"
                        " from taskman_private.task_private where task_id = %s",
                        (task_id,)).fetchone()
    assert kept["submit_callback_token"] == new  # what the worker hands the remote next
    assert bytes(kept["callback_token_hash"]) == hashlib.sha256(new.encode()).digest()
    due = conn.execute("select next_poll_at <= now() as due from taskman_private.task_schedule"
                       " where task_id = %s", (task_id,)).fetchone()
    assert due["due"]  # sent again at once

    with pytest.raises(psycopg.Error) as err:
        _report(api, task_id, old, "failed")
    assert err.value.sqlstate == "PT403"
    assert _report(api, task_id, new, "in_progress")["status"] == "in_progress"


def test_a_retried_polled_submit_keeps_its_job_and_still_gets_a_new_token(conn, api) -> None:
    created = api.rpc("authenticated", "create_task", USER_A,
                      submit_url="https://api.example.com/jobs", submit_body=Jsonb({"n": 1}))
    task_id, old = created["task_id"], created["callback_token"]
    conn.execute("update taskman.tasks set submitted_at = now(), status = 'failed',"
                 " poll_url = 'https://api.example.com/jobs/1', error_code = 'remote_failed'"
                 " where task_id = %s", (task_id,))

    new = api.rpc("authenticated", "retry_task", USER_A, task_id=task_id)["callback_token"]
    row = task_row(conn, task_id)
    assert row["submitted_at"] is not None  # not submitted again: it polls the same job
    assert row["poll_url"] == "https://api.example.com/jobs/1"
    with pytest.raises(psycopg.Error) as err:
        _report(api, task_id, old)
    assert err.value.sqlstate == "PT403"
    assert _report(api, task_id, new)["status"] == "completed"
