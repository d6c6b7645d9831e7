"""The seed's n8n webhooks work unchanged: its curl examples, bodies verbatim."""

from __future__ import annotations

import json
import uuid

import pytest

# The seed's bodies, character for character.
SEED_CREATE_BODY = """{
  "external_id": "abc123",
  "poll_url": "https://api.example.com/status/abc123",
  "poll_method": "GET",
  "task_type": "ml_training",
  "max_attempts": 5,
  "timeout_minutes": 60
}"""
SEED_UPDATE_BODY = """{
  "status": "completed",
  "result": {"summary": "Job done successfully"}
}"""
JSON = {"Content-Type": "application/json"}


def test_seed_create_task_returns_the_full_task_with_a_generated_id(service) -> None:
    response = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON)

    assert response.status_code == 201
    task = response.json()
    assert task["task_id"] and task["status"] == "pending"
    assert {k: task[k] for k in json.loads(SEED_CREATE_BODY)} == json.loads(SEED_CREATE_BODY)
    assert task["callback_token"]
    assert "poll_headers" not in task and "lease_owner" not in task


def test_seed_task_status_answers_status_and_result(service) -> None:
    task_id = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON).json()["task_id"]

    response = service.get(f"/task-status/{task_id}")

    assert response.status_code == 200
    assert response.json()["task_id"] == task_id
    assert response.json()["status"] == "pending"
    assert response.json()["result"] is None


def test_seed_update_task_completes_the_task(service) -> None:
    task_id = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON).json()["task_id"]

    response = service.post(f"/update-task/{task_id}", content=SEED_UPDATE_BODY, headers=JSON)

    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.json()["result"] == {"summary": "Job done successfully"}


def test_seed_workflow_end_to_end(service, db) -> None:
    created = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON).json()
    task_id = created["task_id"]
    assert service.get(f"/task-status/{task_id}").json()["status"] == "pending"

    service.post(f"/update-task/{task_id}", content=SEED_UPDATE_BODY, headers=JSON)

    status = service.get(f"/task-status/{task_id}").json()
    assert status["status"] == "completed"
    assert status["result"] == {"summary": "Job done successfully"}
    assert status["progress"] == 100 and status["completed_at"]
    kinds = [r["event_type"] for r in db.execute(
        "select event_type from taskman.task_events where task_id = %s order by event_id",
        (task_id,))]
    assert kinds == ["created", "status_changed", "callback_received"]


def test_seed_routes_require_the_api_key(edge) -> None:
    with edge.client(token=None) as anonymous, edge.client(token="wrong-key") as wrong:
        for client in (anonymous, wrong):
            response = client.post("/create-task", content=SEED_CREATE_BODY, headers=JSON)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"


def test_seed_update_of_a_finished_task_is_a_conflict(service) -> None:
    task_id = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON).json()["task_id"]
    service.post(f"/update-task/{task_id}", content=SEED_UPDATE_BODY, headers=JSON)

    response = service.post(f"/update-task/{task_id}", json={"status": "failed"})

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert "already completed" in response.json()["error"]["message"]


# n8n's HTTP Request node, body "Using Fields Below", sends every field as text.
N8N_FIELDS_BODY = {"external_id": "abc124", "poll_url": "https://api.example.com/status/abc124",
                   "task_type": "ml_training", "max_attempts": "5", "timeout_minutes": "60",
                   "poll_interval_seconds": " 15 "}


@pytest.mark.parametrize("path", ["/create-task", "/tasks", "/webhook/create-task"])
def test_numeric_fields_given_as_text_are_numbers(service, path) -> None:
    response = service.post(path, json=N8N_FIELDS_BODY)

    assert response.status_code == 201, response.text
    task = response.json()
    assert (task["max_attempts"], task["timeout_minutes"], task["poll_interval_seconds"]) == (
        5, 60, 15)


@pytest.mark.parametrize(("field", "value"), [
    ("max_attempts", "five"), ("max_attempts", "5.5"), ("timeout_minutes", ""),
    ("poll_interval_seconds", "1e3"), ("max_attempts", "0x10"), ("timeout_minutes", "٣"),
])
@pytest.mark.parametrize("path", ["/create-task", "/tasks"])
def test_text_that_is_not_a_whole_number_is_refused_naming_the_field(
    service, db, path, field, value
) -> None:
    external_id = f"not-a-number-{field}-{path}"
    response = service.post(path, json={**N8N_FIELDS_BODY, "external_id": external_id,
                                        field: value})

    assert response.status_code == 422
    assert field in response.json()["error"]["message"]
    assert db.execute("select count(*) as n from taskman.tasks where external_id = %s",
                      (external_id,)).fetchone()["n"] == 0


def test_numeric_text_out_of_range_is_refused_like_the_number(service) -> None:
    response = service.post("/create-task", json={**N8N_FIELDS_BODY, "max_attempts": "100000"})

    assert response.status_code == 422
    assert "max_attempts" in response.json()["error"]["message"]


def test_progress_given_as_text_is_accepted_on_update_task(service) -> None:
    task_id = service.post("/create-task", content=SEED_CREATE_BODY, headers=JSON).json()["task_id"]

    response = service.post(f"/update-task/{task_id}",
                            json={"status": "in_progress", "progress": "40"})

    assert response.status_code == 200
    assert response.json()["progress"] == 40


def _comparable(response, task_id: str) -> tuple:
    """An answer without what differs between two tasks (their ids, times, tokens)."""
    varying = {"created_at", "updated_at", "deadline_at", "next_poll_at", "callback_token",
               "started_at", "completed_at", "last_polled_at"}
    body = json.loads(response.text.replace(task_id, "<task_id>"))
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in varying}
    return response.status_code, response.headers["content-type"], body


def test_the_seed_webhook_prefix_answers_exactly_like_the_plain_routes(service) -> None:
    """The seed's workflows called /webhook/...: only the host changes when moving over."""
    answers: dict[str, list] = {}
    missing = str(uuid.uuid4())
    for prefix in ("", "/webhook"):
        created = service.post(f"{prefix}/create-task", content=SEED_CREATE_BODY, headers=JSON)
        task_id = created.json()["task_id"]
        replies = [
            created,
            service.get(f"{prefix}/task-status/{task_id}"),
            service.post(f"{prefix}/update-task/{task_id}", content=SEED_UPDATE_BODY,
                         headers=JSON),
            service.post(f"{prefix}/update-task/{task_id}", json={"status": "failed"}),
            service.post(f"{prefix}/create-task", json={"max_attempts": "many"}),
            service.get(f"{prefix}/task-status/{missing}"),
            service.post(f"{prefix}/create-task", content=b"{not json", headers=JSON),
        ]
        answers[prefix] = [_comparable(r, task_id) for r in replies]
    assert answers[""] == answers["/webhook"]
    assert [a[0] for a in answers[""]] == [201, 200, 200, 409, 422, 404, 400]


def test_the_webhook_prefix_needs_the_api_key_too(edge) -> None:
    with edge.client(token=None) as anonymous:
        response = anonymous.post("/webhook/create-task", content=SEED_CREATE_BODY,
                                  headers=JSON)
    assert response.status_code == 401
