"""The edge's task routes, errors and operations endpoints."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.edge.conftest import serve_edge


def create(client, **body) -> dict:
    response = client.post("/tasks", json={"poll_url": "https://api.example.com/s/1", **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_same_idempotency_key_returns_the_existing_task(alice) -> None:
    first = create(alice.http, idempotency_key="order-1")

    again = alice.http.post("/tasks", json={"idempotency_key": "order-1"})

    assert again.status_code == 200
    assert again.json()["task_id"] == first["task_id"]
    assert again.json()["idempotent_replay"] is True
    assert "callback_token" not in again.json() or again.json()["callback_token"] is None


def test_list_filters_by_status_type_and_creation_time(alice, service) -> None:
    report = create(alice.http, task_type="report")
    export = create(alice.http, task_type="export")
    service.post(f"/tasks/{export['task_id']}/cancel")

    def ids(**params) -> list[str]:
        response = alice.http.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        return [t["task_id"] for t in response.json()["tasks"]]

    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert ids(task_type="report") == [report["task_id"]]
    assert ids(status="cancelled") == [export["task_id"]]
    assert set(ids(status=["pending", "cancelled"])) == {report["task_id"], export["task_id"]}
    assert ids(**{"from": later}) == []
    assert set(ids(to=later)) == {report["task_id"], export["task_id"]}


def test_list_pages_with_a_cursor_newest_first(alice) -> None:
    created = [create(alice.http)["task_id"] for _ in range(5)]

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = alice.http.get("/tasks", params=params).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == created[::-1]


def test_bad_cursor_is_422(alice) -> None:
    response = alice.http.get("/tasks", params={"cursor": "garbage!"})

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "cursor"


def test_task_events_list_the_history_in_order(alice, service) -> None:
    task_id = create(alice.http)["task_id"]
    service.post(f"/tasks/{task_id}/cancel")
    alice.http.post(f"/tasks/{task_id}/retry")

    first = alice.http.get(f"/tasks/{task_id}/events", params={"limit": 2}).json()
    rest = alice.http.get(f"/tasks/{task_id}/events",
                          params={"after": first["next_after"]}).json()

    kinds = [e["event_type"] for e in first["events"] + rest["events"]]
    assert kinds == ["created", "cancelled", "retried"]
    assert rest["next_after"] is None


def test_service_patch_reports_status_and_replaces_metadata(service) -> None:
    task_id = create(service)["task_id"]

    response = service.patch(f"/tasks/{task_id}", json={
        "status": "in_progress", "progress": 10, "metadata": {"step": "download"}})

    assert response.status_code == 200
    task = response.json()
    assert (task["status"], task["progress"], task["metadata"]) == \
        ("in_progress", 10, {"step": "download"})


def test_empty_patch_is_422(service) -> None:
    task_id = create(service)["task_id"]

    assert service.patch(f"/tasks/{task_id}", json={}).status_code == 422


def test_cancelling_a_finished_task_is_a_conflict(service) -> None:
    task_id = create(service)["task_id"]
    service.post(f"/tasks/{task_id}/cancel")

    response = service.post(f"/tasks/{task_id}/cancel")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"


def test_stats_count_the_callers_tasks(alice, service) -> None:
    done = create(alice.http)["task_id"]
    create(alice.http)
    service.post(f"/update-task/{done}", json={"status": "completed"})

    stats = alice.http.get("/stats").json()

    assert stats["total"] == 2
    assert stats["by_status"]["completed"] == 1 and stats["by_status"]["pending"] == 1
    assert stats["success_rate"] == 1.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"poll_url": "ftp://example.com/x"}, "poll_url"),
        ({"poll_method": "DELETE"}, "poll_method"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2**40}, "max_attempts"),
        ({"metadata": [1, 2]}, "metadata"),
        ({"poll_config": {"profile": "nope"}}, "poll_config"),
        ({"task_type": "bad type!"}, "task_type"),
        ({"external_id": "a\x00b"}, "external_id"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_task_input_is_422_naming_the_field(service, body, field) -> None:
    response = service.post("/tasks", json=body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert field in error["message"]


def test_nul_inside_json_values_is_422(service) -> None:
    response = service.post("/tasks", json={"metadata": {"k": "a\x00b"}})

    assert response.status_code == 422


def test_unparseable_body_is_400(service) -> None:
    for body in (b"{not json", b"\xff\xfe{}"):
        response = service.post("/tasks", content=body,
                                headers={"Content-Type": "application/json"})

        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_body"


def test_malformed_task_id_is_422(service) -> None:
    response = service.get("/tasks/not-a-uuid")

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "task_id"


def test_oversized_body_is_413(service) -> None:
    big = {"metadata": {"blob": "x" * 70_000}}  # the test edge caps bodies at 64 KiB

    declared = service.post("/tasks", json=big)
    streamed = service.post("/tasks", content=iter([json.dumps(big).encode()]),
                            headers={"Content-Type": "application/json"})

    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_wrong_method_answer_json_errors(service) -> None:
    missing = service.get("/nowhere")
    wrong_method = service.delete("/tasks")

    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_healthz_checks_the_database(edge) -> None:
    with edge.client(token=None) as client:
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_metrics_expose_requests_and_tasks_by_status(edge, service) -> None:
    create(service)
    service.get("/tasks/00000000-0000-4000-8000-000000000000")

    with edge.client(token=None) as client:
        text = client.get("/metrics").text

    assert 'taskman_edge_requests_total{method="POST",route="/tasks",status="201"}' in text
    assert 'route="/tasks/{task_id}",status="404"' in text
    assert "taskman_edge_request_duration_seconds_bucket" in text
    assert 'taskman_tasks{status="pending"}' in text
    assert "taskman_database_up 1.0" in text


def test_openapi_documents_every_route(edge) -> None:
    with edge.client(token=None) as client:
        paths = client.get("/openapi.json").json()["paths"]

    assert {
        "/tasks", "/tasks/{task_id}", "/tasks/{task_id}/events", "/tasks/{task_id}/cancel",
        "/tasks/{task_id}/retry", "/stats", "/callbacks/{task_id}", "/create-task",
        "/task-status/{task_id}", "/update-task/{task_id}", "/events", "/healthz", "/metrics",
    } <= set(paths)


def test_a_database_gone_read_only_answers_503_then_takes_writes_again(database_url,
                                                                        conn) -> None:
    # As when a full disk makes a Supabase project read-only: sessions opened meanwhile
    # refuse writes, and keep refusing them after, until they are replaced.
    database = conn.execute("select current_database() as name").fetchone()["name"]
    conn.execute(f"alter database {database} set default_transaction_read_only = on")
    try:
        with serve_edge(database_url) as edge, edge.client() as service:
            refused = service.post("/tasks", json={"poll_url": "https://api.example.com/s/1"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "database_read_only"
            assert "read-only" in refused.json()["error"]["message"]
            assert service.get("/tasks").status_code == 200  # reads go on
            conn.execute(f"alter database {database} reset default_transaction_read_only")
            # A client retrying every half second gets through within seconds (the edge
            # replaces its connections at most every 5 s, and only ever once refused).
            answers = []
            while not answers or answers[-1] == 503:
                assert len(answers) < 20, answers
                time.sleep(0.5 if answers else 0)
                answers.append(service.post(
                    "/tasks", json={"poll_url": "https://api.example.com/s/1"}).status_code)
            assert answers[-1] == 201, answers
    finally:
        conn.execute(f"alter database {database} reset default_transaction_read_only")
    assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 1
