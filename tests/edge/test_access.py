"""Who may do what through the edge: RLS decides, exactly as under PostgREST."""

from __future__ import annotations

import uuid

import jwt
import pytest

from tests.edge.conftest import user_token


def create(client, **body) -> dict:
    response = client.post("/tasks", json={"poll_url": "https://api.example.com/s/1", **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_user_task_is_owned_by_the_signed_in_user(alice) -> None:
    task = create(alice.http)

    assert task["user_id"] == alice.id


def test_user_b_cannot_read_user_a_task(alice, bob) -> None:
    task_id = create(alice.http)["task_id"]

    for path in (f"/tasks/{task_id}", f"/task-status/{task_id}", f"/tasks/{task_id}/events"):
        response = bob.http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
        assert alice.http.get(path).status_code == 200


def test_unknown_task_and_someone_elses_task_look_the_same(alice, bob) -> None:
    task_id = create(alice.http)["task_id"]

    theirs = bob.http.get(f"/tasks/{task_id}").json()
    unknown_id = str(uuid.uuid4())
    unknown = bob.http.get(f"/tasks/{unknown_id}").json()

    assert theirs["error"]["message"].replace(task_id, "X") == \
        unknown["error"]["message"].replace(unknown_id, "X")


def test_user_b_does_not_see_user_a_tasks_in_lists_or_stats(alice, bob) -> None:
    mine = create(bob.http)["task_id"]
    create(alice.http)

    listed = bob.http.get("/tasks").json()["tasks"]
    stats = bob.http.get("/stats").json()

    assert [t["task_id"] for t in listed] == [mine]
    assert stats["total"] == 1


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_user_b_cannot_cancel_or_retry_user_a_task(alice, bob, service, action) -> None:
    task_id = create(alice.http)["task_id"]
    if action == "retry":
        service.post(f"/tasks/{task_id}/cancel")

    response = bob.http.post(f"/tasks/{task_id}/{action}")

    assert response.status_code == 404
    status = alice.http.get(f"/tasks/{task_id}").json()["status"]
    assert status == ("pending" if action == "cancel" else "cancelled")


def test_user_b_cannot_change_user_a_metadata(alice, bob) -> None:
    task_id = create(alice.http, metadata={"owner": "alice"})["task_id"]

    response = bob.http.patch(f"/tasks/{task_id}", json={"metadata": {"owner": "bob"}})

    assert response.status_code == 404
    assert alice.http.get(f"/tasks/{task_id}").json()["metadata"] == {"owner": "alice"}


def test_owner_cancels_and_retries_own_task(alice) -> None:
    task_id = create(alice.http)["task_id"]

    assert alice.http.post(f"/tasks/{task_id}/cancel").json()["status"] == "cancelled"
    assert alice.http.post(f"/tasks/{task_id}/retry").json()["status"] == "pending"


def test_owner_may_change_metadata_but_not_status(alice) -> None:
    task_id = create(alice.http)["task_id"]

    changed = alice.http.patch(f"/tasks/{task_id}", json={"metadata": {"note": "hi"}})
    refused = alice.http.patch(f"/tasks/{task_id}", json={"status": "completed"})

    assert changed.status_code == 200 and changed.json()["metadata"] == {"note": "hi"}
    assert refused.status_code == 403
    assert alice.http.get(f"/tasks/{task_id}").json()["status"] == "pending"


def test_owner_cannot_report_on_own_task_without_its_callback_token(alice) -> None:
    created = create(alice.http)

    refused = alice.http.post(f"/update-task/{created['task_id']}", json={"status": "completed"})
    allowed = alice.http.post(f"/update-task/{created['task_id']}",
                              json={"status": "completed",
                                    "callback_token": created["callback_token"]})

    assert refused.status_code == 403
    assert allowed.status_code == 200 and allowed.json()["status"] == "completed"


def test_api_key_sees_every_users_tasks(alice, bob, service) -> None:
    ids = {create(alice.http)["task_id"], create(bob.http)["task_id"]}

    listed = {t["task_id"] for t in service.get("/tasks", params={"limit": 500}).json()["tasks"]}

    assert ids <= listed
    for task_id in ids:
        assert service.get(f"/tasks/{task_id}").status_code == 200


def test_service_role_jwt_acts_as_the_service(alice, edge) -> None:
    task_id = create(alice.http)["task_id"]
    # Supabase's service_role key is a JWT without an audience.
    token = user_token("ignored", role="service_role", aud=None)

    with edge.client(token) as client:
        response = client.patch(f"/tasks/{task_id}", json={"status": "in_progress"})

    assert response.status_code == 200 and response.json()["status"] == "in_progress"


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, 401),
        ("not-a-key", 401),
        (user_token(str(uuid.uuid4()), expires_in=-3600), 401),
        (user_token(str(uuid.uuid4()), secret="another-secret-of-at-least-32-bytes!!"), 401),
        (user_token(str(uuid.uuid4()), aud="someone-else"), 401),
        (user_token(str(uuid.uuid4()), aud=None), 401),
        (user_token("not-a-uuid"), 401),
        (user_token(str(uuid.uuid4()), role="postgres"), 401),
        (user_token(str(uuid.uuid4()), role="anon"), 403),
    ],
    ids=["missing", "unknown-key", "expired", "wrong-signature", "wrong-audience",
         "no-audience", "subject-not-uuid", "other-role", "anon"],
)
def test_bad_credentials_are_refused(edge, token, status) -> None:
    with edge.client(token) as client:
        for response in (client.get("/tasks"), client.post("/tasks", json={})):
            assert response.status_code == status
            assert response.json()["error"]["code"] in ("unauthorized", "forbidden")


def test_unsigned_jwt_is_refused(edge) -> None:
    token = jwt.encode({"sub": str(uuid.uuid4()), "role": "service_role", "exp": 2**40},
                       key=None, algorithm="none")
    with edge.client(token) as client:
        assert client.get("/tasks").status_code == 401
