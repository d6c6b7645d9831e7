"""Taskman starts the job: the submit request, against real fake remotes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest

from tests.edge.conftest import API_KEY, serve_edge
from tests.factories import create_task, events, task_row
from tests.remote_api import RemoteAPI, Reply
from tests.worker_harness import REPO, running_worker, start_worker_process, wait_until


def finished(conn: psycopg.Connection, task_id: str) -> dict:
    return wait_until(lambda: conn.execute(
        "select * from taskman.tasks where task_id = %s"
        " and status in ('completed', 'failed', 'cancelled')", (task_id,)).fetchone())


def posts(remote: RemoteAPI, path: str) -> list:
    return [h for h in remote.hits(path) if h.method == "POST"]


def private_row(conn: psycopg.Connection, task_id: str) -> dict:
    return conn.execute("select * from taskman_private.task_private where task_id = %s",
                        (task_id,)).fetchone()


def test_a_submitted_job_is_polled_at_its_location_and_sent_once_with_its_key(
        conn, database_url, remote) -> None:
    submit_url = remote.script("/v1/jobs", Reply(202, json={"queued": True},
                                                 headers={"Location": "/v1/jobs/abc"}))
    remote.script("/v1/jobs/abc", Reply(json={"status": "running"}),
                  Reply(json={"status": "done", "result": {"rows": 3}}))
    task = create_task(conn, poll_url=None, submit_url=submit_url, poll_interval_seconds=1,
                       submit_headers={"Authorization": "Bearer s3cret", "X-Run": "{task_id}"},
                       submit_body={"input": "report", "ref": "{task_id}"})
    task_id = task["task_id"]
    assert task["submit_method"] == "POST" and task["submitted_at"] is None
    assert "submit_headers" not in task and "s3cret" not in str(task)
    with running_worker(database_url):
        row = finished(conn, task_id)
    assert (row["status"], row["result"]) == ("completed", {"rows": 3})
    assert row["poll_url"] == remote.url("/v1/jobs/abc") and row["submitted_at"] is not None
    [sent] = posts(remote, "/v1/jobs")
    assert sent.headers["Idempotency-Key"] == task_id
    assert sent.headers["Authorization"] == "Bearer s3cret" and sent.headers["X-Run"] == task_id
    assert sent.json() == {"input": "report", "ref": task_id}
    assert len(remote.hits("/v1/jobs/abc")) == 2
    [submitted] = [e for e in events(conn, task_id) if e["event_type"] == "submitted"]
    assert submitted["detail"]["http_status"] == 202 and submitted["detail"]["latency_ms"] >= 0
    assert submitted["detail"]["outcome"] == "accepted"
    assert "queued" not in str(events(conn, task_id))  # the raw answer stays service-side
    assert row["submit_headers"] is None


def test_the_job_id_fills_the_profiles_poll_url_template(conn, database_url, remote) -> None:
    submit_url = remote.script("/api/run", Reply(200, json={"job": {"id": "j 7"},
                                                            "status": "queued"}))
    remote.script("/api/jobs/j%207", Reply(json={"status": "done", "result": 1}))
    config = {"job_id_path": "job.id", "poll_url_template": remote.url("/api/jobs/{job_id}")}
    task_id = create_task(conn, poll_url=None, submit_url=submit_url, poll_config=config,
                          poll_interval_seconds=1)["task_id"]
    with running_worker(database_url):
        row = finished(conn, task_id)
    assert (row["status"], row["external_id"]) == ("completed", "j 7")
    assert row["poll_url"] == remote.url("/api/jobs/j%207")


def test_a_poll_url_path_handle_and_a_303_location_both_work(conn, database_url, remote) -> None:
    a = remote.script("/a", Reply(200, json={"links": {"status": "/a/1"}}))
    remote.script("/a/1", Reply(json={"status": "done"}))
    b = remote.script("/b", Reply(303, headers={"Location": remote.url("/b/1")}))
    remote.script("/b/1", Reply(json={"status": "done"}))
    first = create_task(conn, poll_url=None, submit_url=a, poll_interval_seconds=1,
                        poll_config={"poll_url_path": "links.status"})["task_id"]
    second = create_task(conn, poll_url=None, submit_url=b, poll_interval_seconds=1)["task_id"]
    with running_worker(database_url):
        assert finished(conn, first)["status"] == "completed"
        assert finished(conn, second)["status"] == "completed"
    assert task_row(conn, first)["poll_url"] == remote.url("/a/1")
    assert [h.method for h in remote.hits("/b")] == ["POST"]  # the 303 is not followed


def test_a_synchronous_answer_ends_the_task_at_once(conn, database_url, remote) -> None:
    done = remote.script("/sync-ok", Reply(200, json={"status": "done", "result": {"x": 1}}))
    bad = remote.script("/sync-bad", Reply(200, json={"status": "failed", "error": "boom"}))
    ok_id = create_task(conn, poll_url=None, submit_url=done)["task_id"]
    bad_id = create_task(conn, poll_url=None, submit_url=bad)["task_id"]
    with running_worker(database_url):
        ok, failed = finished(conn, ok_id), finished(conn, bad_id)
    assert (ok["status"], ok["result"], ok["poll_url"]) == ("completed", {"x": 1}, None)
    assert (failed["status"], failed["error_code"]) == ("failed", "remote_failed")
    assert "boom" not in failed["error_message"]
    assert len(remote.hits("/sync-ok")) == 1 and len(remote.hits("/sync-bad")) == 1


def test_transient_failures_are_retried_with_the_same_key_and_count_to_max_attempts(
        conn, database_url, remote) -> None:
    flaky = remote.script("/flaky", Reply(503), Reply(429), Reply(202, headers={
        "Location": "/flaky/1"}))
    remote.script("/flaky/1", Reply(json={"status": "done"}))
    down = remote.script("/down", Reply(502))
    flaky_id = create_task(conn, poll_url=None, submit_url=flaky, poll_interval_seconds=1,
                           max_attempts=5)["task_id"]
    down_id = create_task(conn, poll_url=None, submit_url=down, max_attempts=3)["task_id"]
    with running_worker(database_url):
        assert finished(conn, flaky_id)["status"] == "completed"
        down_row = finished(conn, down_id)
    keys = {h.headers["Idempotency-Key"] for h in posts(remote, "/flaky")}
    assert len(posts(remote, "/flaky")) == 3 and keys == {flaky_id}
    assert (down_row["status"], down_row["error_code"]) == ("failed", "max_attempts")
    assert len(posts(remote, "/down")) == 3
    kinds = [e["event_type"] for e in events(conn, flaky_id)]
    assert kinds.count("submitted") == 3 and kinds.count("retry_scheduled") == 2


def test_a_refusal_fails_with_submit_failed_and_no_handle_with_invalid_response(
        conn, database_url, remote) -> None:
    refused = remote.script("/refused", Reply(400, json={"detail": "secret-ish remote text"}))
    vague = remote.script("/vague", Reply(200, json={"accepted": True}))
    refused_id = create_task(conn, poll_url=None, submit_url=refused)["task_id"]
    vague_id = create_task(conn, poll_url=None, submit_url=vague)["task_id"]
    with running_worker(database_url):
        refused_row, vague_row = finished(conn, refused_id), finished(conn, vague_id)
    assert (refused_row["error_code"], refused_row["submitted_at"]) == ("submit_failed", None)
    assert "HTTP 400" in refused_row["error_message"]
    assert "secret-ish" not in str(refused_row) + str(events(conn, refused_id))
    assert "secret-ish" in private_row(conn, refused_id)["last_response"]
    assert vague_row["error_code"] == "invalid_response"
    assert len(remote.hits("/refused")) == 1 and len(remote.hits("/vague")) == 1


def test_a_failed_submit_is_sent_again_by_retry_but_a_recorded_one_never(
        conn, database_url, remote) -> None:
    url = remote.script("/once", Reply(400), Reply(202, headers={"Location": "/once/1"}))
    remote.script("/once/1", Reply(json={"status": "failed"}))
    task_id = create_task(conn, poll_url=None, submit_url=url, poll_interval_seconds=1)["task_id"]
    with running_worker(database_url):
        assert finished(conn, task_id)["error_code"] == "submit_failed"
        conn.execute("select taskman.retry_task(%s)", (task_id,))
        assert finished(conn, task_id)["error_code"] == "remote_failed"  # submitted, then failed
        conn.execute("select taskman.retry_task(%s)", (task_id,))
        wait_until(lambda: len(remote.hits("/once/1")) >= 2)  # polled again, not resubmitted
        finished(conn, task_id)
    assert len(posts(remote, "/once")) == 2


def test_callback_url_hands_the_remote_the_edges_route_with_the_tasks_token(
        conn, database_url, remote) -> None:
    url = remote.script("/hooks", Reply(202, json={"accepted": True}))
    with serve_edge(database_url) as edge:
        created = create_task(conn, poll_url=None, submit_url=url,
                              submit_body={"notify": "{callback_url}", "id": "{task_id}"},
                              submit_headers={"X-Callback": "{callback_url}"})
        task_id = created["task_id"]
        with running_worker(database_url, TASKMAN_PUBLIC_URL=edge.url + "/"):
            row = wait_until(lambda: (r := task_row(conn, task_id))["submitted_at"] and r)
            [sent] = remote.hits("/hooks")
            callback = sent.json()["notify"]
            assert sent.headers["X-Callback"] == callback and sent.json()["id"] == task_id
            assert callback.startswith(f"{edge.url}/callbacks/{task_id}?token=")
            assert (row["status"], row["poll_url"]) == ("in_progress", None)
            schedule = conn.execute("select next_poll_at from taskman_private.task_schedule"
                                    " where task_id = %s", (task_id,)).fetchone()
            assert schedule["next_poll_at"] is None
            # The remote calls back, with no API key: the token in the URL is enough.
            answer = httpx.post(callback, json={"status": "completed", "result": {"n": 1}})
            assert answer.status_code == 200, answer.text
            assert finished(conn, task_id)["result"] == {"n": 1}
            token = parse_qs(urlsplit(callback).query)["token"][0]
            assert token == created["callback_token"]  # the one its creator was given
            forged = httpx.post(f"{edge.url}/callbacks/{task_id}?token={token[:-1]}x", json={})
            assert forged.status_code == 403
        assert len(remote.hits("/hooks")) == 1


def test_callback_url_without_public_url_fails_with_a_message_naming_the_setting(
        conn, database_url, remote) -> None:
    url = remote.script("/hooks", Reply(202))
    task_id = create_task(conn, poll_url=None, submit_url=url,
                          submit_body={"notify": "{callback_url}"})["task_id"]
    with running_worker(database_url):
        row = finished(conn, task_id)
    assert row["error_code"] == "submit_failed" and "TASKMAN_PUBLIC_URL" in row["error_message"]
    assert remote.hits("/hooks") == []


def test_a_worker_killed_between_send_and_record_resends_the_same_key_once(
        conn, database_url, remote, workers) -> None:
    # The first answer never comes in time: the worker is killed while it waits.
    url = remote.script("/slow", Reply(202, headers={"Location": "/slow/1"}, delay=30),
                        Reply(202, headers={"Location": "/slow/1"}))
    remote.script("/slow/1", Reply(json={"status": "running"}))
    task_id = create_task(conn, poll_url=None, submit_url=url, poll_interval_seconds=1,
                          submit_body={"n": 1})["task_id"]
    # A submit is sent only with its whole timeout left on the lease.
    env = {"TASKMAN_LEASE_SECONDS": "5", "TASKMAN_POLL_TIMEOUT": "4"}
    first = start_worker_process(database_url, **env)
    workers.append(first)
    wait_until(lambda: remote.hits("/slow"), timeout=30)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert task_row(conn, task_id)["submitted_at"] is None  # sent, never recorded

    second = start_worker_process(database_url, **env)
    workers.append(second)
    row = wait_until(lambda: (r := task_row(conn, task_id))["submitted_at"] and r, timeout=30)
    wait_until(lambda: len(remote.hits("/slow/1")) >= 3, timeout=30)  # polling goes on
    hits = posts(remote, "/slow")
    assert len(hits) == 2
    assert [h.headers["Idempotency-Key"] for h in hits] == [task_id, task_id]
    assert hits[0].body == hits[1].body
    assert row["poll_url"] == remote.url("/slow/1") and row["status"] == "in_progress"


@pytest.mark.parametrize(("args", "field"), [
    ({"submit_url": "ftp://api.example.com/jobs"}, "submit_url"),
    ({"submit_url": "https://api.example.com/jobs", "poll_url": "https://api.example.com/s"},
     "poll_url"),
    ({"submit_url": "https://api.example.com/jobs", "submit_method": "DELETE"}, "submit_method"),
    ({"submit_body": {"a": 1}}, "submit_url"),
    ({"submit_url": "https://api.example.com/jobs",
      "poll_config": {"poll_url_template": "https://api.example.com/jobs/"}}, "poll_config"),
    ({"submit_url": "https://api.example.com/jobs",
      "submit_headers": {"Idempotency-Key": "mine"}}, "submit_headers"),
    ({"submit_url": "https://api.example.com/jobs", "submit_headers": {"X-A": "a\nb"}},
     "submit_headers"),
])
def test_bad_submit_input_is_refused_naming_the_field(conn, args, field) -> None:
    before = conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"]
    args.setdefault("poll_url", None)
    with pytest.raises(psycopg.Error) as refused:
        create_task(conn, **args)
    assert refused.value.sqlstate == "22023" and field in refused.value.diag.message_primary
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == before


def test_a_profile_template_without_job_id_is_refused(conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("insert into taskman.response_profiles (name, status_path, poll_url_template)"
                      " values ('nojob', 'status', 'https://api.example.com/jobs')")


def test_submit_through_a_plain_insert_the_edge_and_the_cli(conn, database_url, api) -> None:
    user = "aaaaaaaa-0000-4000-8000-00000000000a"
    with api.request("authenticated", user) as cur:
        cur.execute("insert into taskman.tasks (submit_url, submit_headers, submit_body)"
                    " values ('https://api.example.com/jobs', '{\"X-Key\": \"k1\"}', '{\"a\": 1}')"
                    " returning task_id, submit_headers, submit_method")
        inserted = cur.fetchone()
    assert inserted["submit_headers"] is None and inserted["submit_method"] == "POST"
    assert private_row(conn, inserted["task_id"])["submit_headers"] == {"X-Key": "k1"}

    with serve_edge(database_url) as edge, edge.client(API_KEY) as http:
        created = http.post("/tasks", json={"submit_url": "https://api.example.com/jobs",
                                            "submit_body": {"q": "{task_id}"},
                                            "submit_headers": {"X-Key": "k2"}})
        assert created.status_code == 201, created.text
        assert created.json()["submit_body"] == {"q": "{task_id}"}
        assert "k2" not in created.text
        refused = http.post("/create-task", json={"submit_url": "mailto:someone@example.com"})
        assert refused.status_code == 422 and "submit_url" in refused.text
    env = {**os.environ, "DATABASE_URL": database_url}
    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "create", "--submit-url",
         "https://api.example.com/jobs", "--submit-body", '{"x": 1}', "--submit-header",
         "X-Key: k3", "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "k3" not in cli.stdout and '"submit_url": "https://api.example.com/jobs"' in cli.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "worker.cli", "create", "--submit-url", "ftp://x.example.com"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "submit_url" in bad.stderr


def test_submit_headers_cannot_be_read_back_by_users(conn, api) -> None:
    user = "aaaaaaaa-0000-4000-8000-00000000000b"
    created = api.rpc("authenticated", "create_task", sub=user,
                      submit_url="https://api.example.com/jobs",
                      submit_headers='{"Authorization": "Bearer hidden"}')
    assert "hidden" not in str(created)
    with api.request("authenticated", user) as cur:
        cur.execute("select to_jsonb(t) as row from taskman.tasks t where task_id = %s",
                    (created["task_id"],))
        assert "hidden" not in str(cur.fetchone())
    for role in ("authenticated", "anon"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), api.request(role, user) as cur:
            cur.execute("select submit_headers from taskman_private.task_private")
    assert private_row(conn, created["task_id"])["submit_headers"] == {
        "Authorization": "Bearer hidden"}


def test_a_submit_answer_that_cannot_be_stored_ends_the_task_and_is_not_sent_again(
        conn, database_url, remote) -> None:
    # A job id jsonb cannot hold (a NUL character) makes the batch's record fail.
    url = remote.script("/nul", Reply(202, json={"id": "job\u0000"}))
    task_id = create_task(conn, poll_url=None, submit_url=url, max_attempts=5,
                          poll_config={"job_id_path": "id",
                                       "poll_url_template": remote.url("/nul/{job_id}")}
                          )["task_id"]
    with running_worker(database_url):
        row = finished(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "invalid_response")
    assert "could not be stored" in private_row(conn, task_id)["last_error"]
    assert len(posts(remote, "/nul")) == 1
