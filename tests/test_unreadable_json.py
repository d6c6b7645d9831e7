"""JSON that could be stored but not served is refused wherever it enters: nested more than
64 deep, or a number of magnitude 1e308 or more (an integer of more than 4,300 digits
Python cannot read; a larger fraction it reads as infinity). Each entry is tried, through
PostgREST's path (SET LOCAL ROLE, JWT claims), the edge and a real worker: SQLSTATE 22023
naming the field (422 at the edge), nothing changed, and the edge still serves the task."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PostgREST, _postgrest
from tests.edge.conftest import Edge, serve_edge, user_token
from tests.factories import create_task, task_row
from tests.remote_api import RemoteAPI, Reply
from tests.worker_harness import running_worker, wait_until

DEEP = "must nest arrays and objects at most 64 deep"
LARGE = "must hold only numbers of magnitude below 1e308"


def nested(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


# Each as the text of a value under one key (metadata must be an object): {"x": <text>}.
UNSERVABLE = {
    "65 levels": (nested(64), DEEP),
    "3,000 levels": ('{"a":' * 3000 + "1" + "}" * 3000, DEEP),
    "an integer of 4,301 digits": ("9" * 4301, LARGE),
    "1e308": ("1e308", LARGE),
    "-1e400": ("-1e400", LARGE),
    "a fraction past a double": ("1" * 400 + ".5", LARGE),
}
CASES = pytest.mark.parametrize("text, message", UNSERVABLE.values(), ids=UNSERVABLE.keys())
# 64 levels, the largest integers allowed (308 digits) and a fraction.
SERVABLE = '{"x": ' + nested(62) + ', "n": [' + "9" * 308 + ", -" + "9" * 308 + ", 0.5]}"


def doc(text: str) -> str:
    return '{"x": ' + text + "}"


@pytest.fixture(scope="module")
def sql(module_conn: psycopg.Connection) -> psycopg.Connection:
    return module_conn


@pytest.fixture(scope="module")
def rest(module_database_url: str) -> Iterator[PostgREST]:
    with _postgrest(module_database_url) as client:
        yield client


@pytest.fixture(scope="module")
def edge(module_database_url: str) -> Iterator[Edge]:
    with serve_edge(module_database_url) as server:
        yield server


@pytest.fixture
def user() -> str:
    return str(uuid.uuid4())


def refused(call: Any, field: str, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as caught:
        call()
    assert caught.value.diag.message_primary == f"{field} {message}"
    assert caught.value.diag.column_name == field


def count_tasks(sql: psycopg.Connection, user: str) -> int:
    return sql.execute("select count(*) as n from taskman.tasks where user_id = %s",
                       (user,)).fetchone()["n"]


def served(edge: Edge, task_id: str) -> dict[str, Any]:
    """The task as the edge answers for it (the service's view), which must be 200."""
    with edge.client() as client:
        response = client.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        assert client.get("/tasks", params={"limit": 100}).status_code == 200
    return response.json()


@CASES
@pytest.mark.parametrize("field", ["metadata", "poll_body", "submit_body"])
def test_create_task_refuses_it(rest, sql, user, field, text, message) -> None:
    urls = ({"submit_url": "https://api.example.com/jobs"} if field == "submit_body"
            else {"poll_url": "https://api.example.com/jobs/1"})
    named = ", ".join(f"{k} => %({k})s" for k in urls)

    def create() -> None:
        with rest.request("authenticated", user) as cur:
            cur.execute(f"select taskman.create_task({named}, {field} => %(doc)s::jsonb)",
                        {**urls, "doc": doc(text)})

    refused(create, field, message)
    assert count_tasks(sql, user) == 0


@CASES
@pytest.mark.parametrize("field", ["metadata", "poll_body"])
def test_a_plain_insert_refuses_it(rest, sql, user, field, text, message) -> None:
    def insert() -> None:
        with rest.request("authenticated", user) as cur:
            cur.execute(f"insert into taskman.tasks (user_id, poll_url, {field})"
                        " values (%s, 'https://api.example.com/jobs/1', %s::jsonb)",
                        (user, doc(text)))

    refused(insert, field, message)
    assert count_tasks(sql, user) == 0


@CASES
def test_a_plain_update_refuses_it(rest, sql, edge, user, text, message) -> None:
    with rest.request("authenticated", user) as cur:
        cur.execute("select taskman.create_task(metadata => '{\"kept\": true}') as r")
        task_id = cur.fetchone()["r"]["task_id"]
    before = task_row(sql, task_id)

    def update(role: str, column: str) -> None:
        with rest.request(role, user if role == "authenticated" else None) as cur:
            cur.execute(f"update taskman.tasks set {column} = %s::jsonb where task_id = %s",
                        (doc(text), task_id))

    refused(lambda: update("authenticated", "metadata"), "metadata", message)
    for column in ("metadata", "poll_body", "result"):
        refused(lambda column=column: update("service_role", column), column, message)
    assert task_row(sql, task_id) == before
    assert served(edge, task_id)["metadata"] == {"kept": True}


@CASES
@pytest.mark.parametrize("role", ["service_role", "anon"])
def test_update_task_refuses_it(rest, sql, edge, role, text, message) -> None:
    task = create_task(sql)
    before = task_row(sql, task["task_id"])

    def update() -> None:
        token = task["callback_token"] if role == "anon" else None
        with rest.request(role) as cur:
            cur.execute("select taskman.update_task(task_id => %s, status => 'completed',"
                        " result => %s::jsonb, callback_token => %s)",
                        (task["task_id"], doc(text), token))

    refused(update, "result", message)
    assert task_row(sql, task["task_id"]) == before
    assert served(edge, task["task_id"])["status"] == "pending"


@pytest.mark.parametrize("text", [*(t for t, _ in UNSERVABLE.values()), "NaN", "-Infinity"],
                         ids=[*UNSERVABLE.keys(), "NaN", "-Infinity"])
def test_a_callback_with_it_is_refused(sql, edge, text) -> None:
    """Taskman's report shape, or read through the task's profile ({"status": "done"}):
    422 naming the result (or the body, where Python's JSON cannot read it at all)."""
    with edge.client() as service:
        task = service.post("/tasks", json={"task_type": "callback"}).json()
    before = task_row(sql, task["task_id"])
    for body in ('{"status": "completed", "result": ' + doc(text) + "}",
                 '{"status": "done", "result": ' + doc(text) + "}"):
        with httpx.Client(base_url=edge.url, timeout=10) as anonymous:
            response = anonymous.post(f"/callbacks/{task['task_id']}", content=body,
                                      params={"token": task["callback_token"]})
        assert response.status_code in (400, 422), response.text
        error = response.json()["error"]
        if error.get("field") == "result":
            assert error["message"].removeprefix("result ").removeprefix("result: ") in (
                DEEP, LARGE)
    assert task_row(sql, task["task_id"]) == before
    assert served(edge, task["task_id"])["status"] == "pending"


@pytest.mark.parametrize("text", [nested(64), "NaN", "1e400"], ids=["65 levels", "NaN", "1e400"])
def test_the_edge_refuses_it_in_a_report_or_a_new_task(sql, edge, text) -> None:
    """Never a 500: the database's 22023 (or the JSON refused by the driver) is a 422."""
    with edge.client() as service:
        task = service.post("/tasks", json={"task_type": "edge"}).json()
        before = task_row(sql, task["task_id"])
        for method, path, body in [
            ("POST", f"/update-task/{task['task_id']}",
             '{"status": "completed", "result": ' + doc(text) + "}"),
            ("PATCH", f"/tasks/{task['task_id']}", '{"metadata": ' + doc(text) + "}"),
            ("POST", "/tasks", '{"task_type": "edge", "metadata": ' + doc(text) + "}"),
        ]:
            response = service.request(method, path, content=body,
                                        headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (method, path, response.text)
    assert task_row(sql, task["task_id"]) == before
    served(edge, task["task_id"])


def test_a_document_at_the_bounds_is_stored_and_served(rest, edge, user) -> None:
    with rest.request("authenticated", user) as cur:
        cur.execute("select taskman.create_task(metadata => %s::jsonb) as r", (SERVABLE,))
        task = cur.fetchone()["r"]
    assert served(edge, task["task_id"])["metadata"] == json.loads(SERVABLE)
    with httpx.Client(base_url=edge.url, timeout=10,
                      headers={"Authorization": f"Bearer {user_token(user)}"}) as owner:
        assert owner.get(f"/tasks/{task['task_id']}").json()["metadata"] == json.loads(SERVABLE)


@pytest.mark.parametrize("text", [nested(70), "NaN", "1e400", "1" * 400 + ".5"],
                         ids=["71 levels", "NaN", "1e400", "a fraction past a double"])
def test_a_poll_answer_with_it_fails_that_task_alone(sql, edge, remote: RemoteAPI,
                                                     text) -> None:
    """The worker reads the answer but does not record its result: the task fails with
    invalid_response and says why; a task polled beside it completes."""
    bad = remote.script("/bad", Reply(body=('{"status": "done", "result": '
                                            + text + "}").encode()))
    good = remote.script("/good", Reply(json={"status": "done", "result": {"ok": 1}}))
    with running_worker(edge.database_url):
        bad_id = create_task(sql, poll_url=bad)["task_id"]
        good_id = create_task(sql, poll_url=good)["task_id"]
        wait_until(lambda: all(task_row(sql, t)["completed_at"] for t in (bad_id, good_id)))
    failed, completed = task_row(sql, bad_id), task_row(sql, good_id)
    assert (failed["status"], failed["error_code"], failed["result"]) == (
        "failed", "invalid_response", None)
    assert failed["error_message"] in (
        f"The answer's result cannot be stored: it {DEEP}.",
        f"The answer's result cannot be stored: it {LARGE}.")
    assert (completed["status"], completed["result"]) == ("completed", {"ok": 1})
    assert served(edge, bad_id)["error_code"] == "invalid_response"

