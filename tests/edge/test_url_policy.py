"""The edge refuses a task whose poll or callback URL its network policy would refuse later
(422 naming the field and the setting), and creates nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.edge.conftest import Edge, serve_edge


@pytest.fixture(scope="module")
def n8n_edge(edge_database_url: str) -> Iterator[Edge]:
    """An edge allowing 127.0.0.1, as in the issue's n8n setup."""
    with serve_edge(edge_database_url, TASKMAN_ALLOWED_HOSTS="127.0.0.1") as server:
        yield server


def count(db, external_id: str) -> int:
    return db.execute("select count(*) as n from taskman.tasks where external_id = %s",
                      (external_id,)).fetchone()["n"]


@pytest.mark.parametrize("path", ["/tasks", "/create-task", "/webhook/create-task"])
def test_a_callback_url_the_worker_would_refuse_is_422_naming_field_and_setting(
    n8n_edge, db, path
) -> None:
    external_id = f"refused-callback-{path}"
    with n8n_edge.client() as service:
        response = service.post(path, json={
            "poll_url": "http://127.0.0.1:8000/jobs/1", "external_id": external_id,
            "callback_url": "http://localhost:5678/webhook-waiting/12"})

    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_argument", "callback_url")
    assert "localhost resolves to a non-public address" in error["message"]
    assert "TASKMAN_ALLOWED_HOSTS" in error["message"]
    assert count(db, external_id) == 0


def test_an_allowed_host_is_accepted(n8n_edge) -> None:
    with n8n_edge.client() as service:
        response = service.post("/tasks", json={
            "poll_url": "http://127.0.0.1:8000/jobs/1",
            "callback_url": "http://127.0.0.1:5678/webhook-waiting/12"})
    assert response.status_code == 201, response.text


def test_a_private_poll_url_is_refused_by_a_default_edge(service, db) -> None:
    response = service.post("/create-task", json={"poll_url": "http://169.254.169.254/latest",
                                                  "external_id": "metadata-probe"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "poll_url"
    assert "TASKMAN_ALLOW_PRIVATE_NETWORKS" in response.json()["error"]["message"]
    assert count(db, "metadata-probe") == 0


def test_users_get_the_same_refusal(alice) -> None:
    response = alice.http.post("/tasks", json={"callback_url": "http://10.0.0.5/hook"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "callback_url"


def test_a_private_submit_url_is_refused_like_a_poll_url(service, db) -> None:
    response = service.post("/tasks", json={"submit_url": "http://10.0.0.7/jobs",
                                            "external_id": "private-submit"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "submit_url"
    assert count(db, "private-submit") == 0
