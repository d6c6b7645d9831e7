"""Poll headers stay with their origin: a status URL that a submit's answer names on
another origin than the submit URL is polled without the task's poll_headers, unless the
task or its profile names that origin. Two real servers on 127.0.0.1, on two ports (two
origins): the submit's own and a foreign one."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import database_before
from tests.factories import create_task, task_row
from tests.remote_api import RemoteAPI, Reply, remote_api
from tests.test_submit import private_row
from tests.worker_harness import running_worker, wait_until
from worker.migrate import migrate

SECRET = {"X-Api-Key": "remote-api-key"}


@pytest.fixture
def foreign() -> Iterator[RemoteAPI]:
    with remote_api() as api:
        yield api


def _origin(remote: RemoteAPI) -> str:
    return remote.url()


def _keys_seen(remote: RemoteAPI, path: str) -> list[str | None]:
    return [h.headers.get("X-Api-Key") for h in remote.hits(path)]


def _submit_naming(conn, database_url, remote, status_url: str, *, body=None,
                   **task) -> str:
    """A task whose submit answers with `status_url` (Location, or `body`), polled to the end."""
    reply = (Reply(202, json=body) if body is not None
             else Reply(202, headers={"Location": status_url}))
    submit = remote.script("/v1/jobs", reply)
    task_id = create_task(conn, poll_url=None, submit_url=submit, poll_headers=SECRET,
                          poll_interval_seconds=1, **task)["task_id"]
    with running_worker(database_url):
        wait_until(lambda: task_row(conn, task_id)["status"] == "completed")
    return task_id


def test_a_location_on_another_origin_never_sees_the_poll_headers(
        conn, database_url, remote, foreign) -> None:
    status = foreign.script("/jobs/1", Reply(json={"status": "running"}),
                            Reply(json={"status": "done"}))
    task_id = _submit_naming(conn, database_url, remote, status)

    assert len(foreign.hits("/jobs/1")) == 2
    assert _keys_seen(foreign, "/jobs/1") == [None, None]
    assert private_row(conn, task_id)["poll_headers"] is None  # gone, not just held back


def test_a_poll_url_path_on_another_origin_never_sees_them(
        conn, database_url, remote, foreign) -> None:
    status = foreign.script("/jobs/2", Reply(json={"status": "done"}))
    _submit_naming(conn, database_url, remote, status, body={"links": {"status": status}},
                   poll_config={"poll_url_path": "links.status"})

    assert _keys_seen(foreign, "/jobs/2") == [None]


def test_the_submits_own_origin_gets_them(conn, database_url, remote) -> None:
    remote.script("/v1/jobs/7", Reply(json={"status": "running"}), Reply(json={"status": "done"}))
    task_id = _submit_naming(conn, database_url, remote, "/v1/jobs/7")  # relative: same origin

    assert _keys_seen(remote, "/v1/jobs/7") == [SECRET["X-Api-Key"]] * 2
    assert private_row(conn, task_id)["poll_headers"] == SECRET


def test_an_origin_the_task_names_gets_them(conn, database_url, remote, foreign) -> None:
    status = foreign.script("/jobs/3", Reply(json={"status": "done"}))
    _submit_naming(conn, database_url, remote, status,
                   poll_config={"poll_header_origins": [_origin(foreign) + "/"]})

    assert _keys_seen(foreign, "/jobs/3") == [SECRET["X-Api-Key"]]


def test_an_origin_the_profile_names_gets_them(conn, database_url, remote, foreign) -> None:
    conn.execute("insert into taskman.response_profiles (name, status_path, completed_values,"
                 " poll_header_origins) values ('split-api', 'status', '{done}', %s)",
                 ([_origin(foreign)],))
    status = foreign.script("/jobs/4", Reply(json={"status": "done"}))
    _submit_naming(conn, database_url, remote, status, task_type="split-api")

    assert _keys_seen(foreign, "/jobs/4") == [SECRET["X-Api-Key"]]


def test_the_origin_of_the_profiles_url_template_gets_them(
        conn, database_url, remote, foreign) -> None:
    foreign.script("/jobs/j-5", Reply(json={"status": "done"}))
    _submit_naming(conn, database_url, remote, "", body={"id": "j-5"},
                   poll_config={"job_id_path": "id",
                                "poll_url_template": foreign.url("/jobs/{job_id}")})

    assert _keys_seen(foreign, "/jobs/j-5") == [SECRET["X-Api-Key"]]


def test_naming_one_origin_does_not_name_another_port_or_scheme(
        conn, database_url, remote, foreign) -> None:
    status = foreign.script("/jobs/6", Reply(json={"status": "done"}))
    others = [f"https://127.0.0.1:{foreign.port}", f"http://127.0.0.1:{foreign.port + 1}",
              f"http://localhost:{foreign.port}"]
    _submit_naming(conn, database_url, remote, status,
                   poll_config={"poll_header_origins": others})

    assert _keys_seen(foreign, "/jobs/6") == [None]


@pytest.mark.parametrize("origins", [
    "https://status.example.com", ["https://status.example.com/jobs"],
    ["ftp://status.example.com"], ["https://user:pw@status.example.com"], [42],
    ["https://status.example.com?x=1"], ["https://a.example.com"] * 21,
])
def test_bad_origins_are_refused_naming_the_field(conn, origins) -> None:
    with pytest.raises(psycopg.Error) as err:
        create_task(conn, poll_url=None, submit_url="https://api.example.com/jobs",
                    poll_config={"poll_header_origins": origins})
    assert err.value.sqlstate == "22023"
    assert "poll_config .poll_header_origins" in err.value.diag.message_primary
    if isinstance(origins, list) and all(isinstance(o, str) for o in origins):
        with pytest.raises(psycopg.Error) as err:
            conn.execute("insert into taskman.response_profiles (name, status_path,"
                         " poll_header_origins) values ('bad-origins', 'status', %s)",
                         (origins,))
        assert err.value.sqlstate == "22023"
        assert err.value.diag.message_primary.startswith("poll_header_origins ")


def test_tasks_already_polling_a_foreign_origin_lose_their_headers_on_upgrade(
        server_url, tmp_path) -> None:
    with database_before(server_url, "20261207003000", tmp_path) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            ids = {}
            for name, status_url in (("foreign", "https://evil.example.net/jobs/1"),
                                     ("own", "https://api.example.com/jobs/1")):
                ids[name] = conn.execute(
                    "select taskman.create_task(submit_url => 'https://api.example.com/jobs',"
                    " poll_headers => '{\"X-Api-Key\": \"k\"}') ->> 'task_id'").fetchone()[0]
                conn.execute("update taskman.tasks set submitted_at = now(), poll_url = %s,"
                             " status = 'in_progress' where task_id = %s",
                             (status_url, ids[name]))
            polled = conn.execute(
                "select taskman.create_task(poll_url => 'https://other.example.org/1',"
                " poll_headers => '{\"X-Api-Key\": \"k\"}') ->> 'task_id'").fetchone()[0]
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            kept = dict(conn.execute(
                "select task_id::text, poll_headers from taskman_private.task_private"
                " where task_id = any(%s::uuid[])", ([*ids.values(), polled],)).fetchall())
    assert kept == {ids["foreign"]: None, ids["own"]: {"X-Api-Key": "k"},
                    polled: {"X-Api-Key": "k"}}
