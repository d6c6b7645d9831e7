"""Through the edge: what a callback token holder learns, retry's new token, and the
metrics token. This module's edge has TASKMAN_METRICS_TOKEN set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.edge.conftest import API_KEY, Edge, serve_edge

METRICS_TOKEN = "scrape-me-please"


@pytest.fixture(scope="module")
def edge(edge_database_url: str) -> Iterator[Edge]:
    with serve_edge(edge_database_url, TASKMAN_METRICS_TOKEN=METRICS_TOKEN) as server:
        yield server


def _waiting_task(client) -> dict:
    response = client.post("/tasks", json={"metadata": {"customer": "acme"}})
    assert response.status_code == 201, response.text
    return response.json()


def test_update_task_by_token_answers_only_task_id_and_status(alice) -> None:
    task = _waiting_task(alice.http)

    answers = [alice.http.post(f"/update-task/{task['task_id']}",
                               json={"progress": 50, "callback_token": task["callback_token"]})
               for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json() for a in answers] == [{"task_id": task["task_id"], "status": "pending"}] * 2


def test_update_task_by_the_service_answers_the_whole_task(service) -> None:
    task = _waiting_task(service)

    answer = service.post(f"/update-task/{task['task_id']}", json={"progress": 50})

    assert answer.status_code == 200
    assert answer.json()["metadata"] == {"customer": "acme"} and answer.json()["progress"] == 50


def test_retry_returns_a_new_token_and_the_old_one_stops_working(edge, alice) -> None:
    task = _waiting_task(alice.http)
    alice.http.post(f"/tasks/{task['task_id']}/cancel")

    retried = alice.http.post(f"/tasks/{task['task_id']}/retry")
    new = retried.json()["callback_token"]

    with edge.client(token=None) as third_party:
        def report(token: str) -> int:
            return third_party.post(f"/callbacks/{task['task_id']}", params={"token": token},
                                    json={"status": "completed"}).status_code

        assert retried.status_code == 200 and new != task["callback_token"]
        assert report(task["callback_token"]) == 403
        assert alice.http.get(f"/tasks/{task['task_id']}").json()["status"] == "pending"
        assert report(new) == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Bearer {API_KEY}",
                                           METRICS_TOKEN, f"Basic {METRICS_TOKEN}"],
                         ids=["none", "wrong", "api-key", "no-scheme", "basic"])
def test_metrics_refuse_a_request_without_the_metrics_token(edge, authorization) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with edge.client(token=None) as client:
        response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "taskman_tasks" not in response.text


def test_metrics_answer_with_the_metrics_token(edge) -> None:
    with edge.client(token=METRICS_TOKEN) as client:
        response = client.get("/metrics")

    assert response.status_code == 200
    assert 'taskman_tasks{status="pending"}' in response.text
