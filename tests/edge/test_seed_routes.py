"""The seed's n8n webhooks work unchanged: its curl examples, bodies verbatim."""

from __future__ import annotations

import json

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
