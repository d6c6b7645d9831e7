"""Third parties report on a task with POST /callbacks/{task_id}?token=..., no headers."""

from __future__ import annotations

import httpx


def waiting_task(service, **body) -> dict:
    """A task without poll_url: it waits for a callback."""
    response = service.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def callback(edge, task: dict, body, token: str | None = None) -> httpx.Response:
    with edge.client(token=None) as client:  # third parties send no Authorization
        params = {"token": token or task["callback_token"]}
        if isinstance(body, bytes):
            return client.post(f"/callbacks/{task['task_id']}", params=params, content=body)
        return client.post(f"/callbacks/{task['task_id']}", params=params, json=body)


def test_callback_with_the_right_token_completes_the_task(edge, service, db) -> None:
    task = waiting_task(service)

    response = callback(edge, task, {"status": "completed", "result": {"rows": 3}})

    assert response.status_code == 200
    assert response.json() == {"task_id": task["task_id"], "status": "completed"}
    stored = service.get(f"/tasks/{task['task_id']}").json()
    assert stored["status"] == "completed" and stored["result"] == {"rows": 3}
    [event] = db.execute("select detail from taskman.task_events where task_id = %s "
                         "and event_type = 'callback_received'", (task["task_id"],)).fetchall()
    assert event["detail"] == {"via": "callback_token"}


def test_callback_with_a_wrong_token_is_refused_and_changes_nothing(edge, service, db) -> None:
    task = waiting_task(service)
    before = db.execute("select * from taskman.tasks where task_id = %s",
                        (task["task_id"],)).fetchone()

    responses = [
        callback(edge, task, {"status": "completed"}, token="0" * 64),
        callback(edge, task, {"state": "SUCCESS"}, token="0" * 64),  # profile-read path
    ]

    assert [r.status_code for r in responses] == [403, 403]
    assert responses[0].json()["error"]["code"] == "forbidden"
    after = db.execute("select * from taskman.tasks where task_id = %s",
                       (task["task_id"],)).fetchone()
    assert after == before
    kinds = [r["event_type"] for r in db.execute(
        "select event_type from taskman.task_events where task_id = %s", (task["task_id"],))]
    assert kinds == ["created"]


def test_callback_for_an_unknown_task_is_refused_like_a_wrong_token(edge, service) -> None:
    task = waiting_task(service)
    unknown = {**task, "task_id": "00000000-0000-4000-8000-000000000000"}

    response = callback(edge, unknown, {"status": "completed"})

    assert response.status_code == 403


def test_callback_reports_progress_then_failure(edge, service) -> None:
    task = waiting_task(service)

    callback(edge, task, {"status": "in_progress", "progress": 40, "progress_message": "step 2"})
    running = service.get(f"/task-status/{task['task_id']}").json()
    callback(edge, task, {"status": "failed", "error_message": "The export failed."})
    failed = service.get(f"/task-status/{task['task_id']}").json()

    assert (running["status"], running["progress"], running["progress_message"]) == \
        ("in_progress", 40, "step 2")
    # A third party's own words are remote text: users get the neutral sentence.
    assert (failed["status"], failed["error_code"], failed["error_message"]) == \
        ("failed", "remote_failed", "The remote job reported that it failed.")


def test_callback_body_in_another_shape_is_read_with_the_task_profile(edge, service) -> None:
    task = waiting_task(service, task_type="celery")

    response = callback(edge, task, {"task_id": "c-1", "state": "SUCCESS", "result": [1, 2]})

    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert service.get(f"/tasks/{task['task_id']}").json()["result"] == [1, 2]


def test_profile_read_failure_keeps_remote_error_text_private(edge, service) -> None:
    task = waiting_task(service, poll_config={"profile": "standard"})

    callback(edge, task, {"status": "failed", "error": {"message": "db password wrong"}})

    status = service.get(f"/task-status/{task['task_id']}").json()
    assert status["status"] == "failed"
    assert "password" not in status["error_message"]


def test_unreadable_callback_body_is_422_and_changes_nothing(edge, service) -> None:
    task = waiting_task(service)

    responses = [
        callback(edge, task, {"foo": "bar"}),
        callback(edge, task, b"not json at all"),
        callback(edge, task, {"progress": 150}),
    ]

    assert [r.status_code for r in responses] == [422, 422, 422]
    assert "progress" in responses[2].json()["error"]["message"]
    assert service.get(f"/tasks/{task['task_id']}").json()["status"] == "pending"


def test_repeated_final_callback_is_accepted(edge, service) -> None:
    task = waiting_task(service)

    first = callback(edge, task, {"status": "completed"})
    again = callback(edge, task, {"status": "completed"})
    conflicting = callback(edge, task, {"status": "failed"})

    assert (first.status_code, again.status_code, conflicting.status_code) == (200, 200, 409)
