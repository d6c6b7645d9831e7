"""The edge through a session pooler and a transaction pooler (PgBouncer for Supavisor).

Behind a transaction pooler, consecutive transactions of one pooled connection run on
whichever server connection is free: prepared statements and session state would land
on the wrong one, and LISTEN hears nothing. The API and /events must not notice.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg.rows import dict_row

from tests.edge.conftest import API_KEY, serve_edge, user_token
from tests.edge.test_events import Listener
from tests.factories import create_task
from tests.poolers import TRANSACTION, Arrangement, arrangement


def test_api_and_events_through_the_pooler(pooled: Arrangement) -> None:
    with serve_edge(pooled.database_url, **pooled.settings) as edge:
        def create_and_read(n: int) -> list[tuple[int, int]]:
            answers = []
            with edge.client() as http:
                for i in range(n):
                    created = http.post("/tasks", json={"poll_url": f"https://x.example/{i}"})
                    read = http.get(f"/tasks/{created.json().get('task_id')}")
                    answers.append((created.status_code, read.status_code))
            return answers

        with ThreadPoolExecutor(4) as pool:
            answers = [a for batch in pool.map(create_and_read, [25] * 4) for a in batch]
        assert answers == [(201, 200)] * 100

        # Each request's role and claims are its own, whichever server connection ran it.
        alice_id, bob_id = str(uuid.uuid4()), str(uuid.uuid4())
        alice_token, bob_token = user_token(alice_id), user_token(bob_id)
        with edge.client(alice_token) as alice, edge.client(bob_token) as bob:
            alice_stream, bob_stream = Listener(edge.url, alice_token), Listener(edge.url,
                                                                                 bob_token)
            alice_stream.wait_connected()
            bob_stream.wait_connected()
            for _ in range(3):
                task_id = alice.post("/tasks", json={"poll_url": "https://x.example/a"}
                                     ).json()["task_id"]
                assert bob.get(f"/tasks/{task_id}").status_code == 404
                assert alice.get(f"/tasks/{task_id}").json()["user_id"] == alice_id
            assert bob.get("/tasks").json()["tasks"] == []
            assert alice.post(f"/tasks/{task_id}/cancel").status_code == 200

            events = [alice_stream.next_event() for _ in range(4)]
            assert events[-1] == {"task_id": task_id, "status": "cancelled", "user_id": alice_id}
            assert [e["status"] for e in events] == ["pending"] * 3 + ["cancelled"]
            marker = bob.post("/tasks", json={"poll_url": "https://x.example/b"}).json()
            assert bob_stream.next_event()["task_id"] == marker["task_id"]  # and nothing else
            alice_stream.close()
            bob_stream.close()


def test_polled_events_include_a_change_committed_after_later_ones(poolers,
                                                                   database_url) -> None:
    polled = arrangement(TRANSACTION, poolers, database_url)
    with serve_edge(polled.database_url, **polled.settings) as edge, edge.client() as http:
        stream = Listener(edge.url, API_KEY)
        stream.wait_connected()
        with psycopg.connect(database_url, row_factory=dict_row) as slow:
            late = create_task(slow)["task_id"]  # its event's id is taken, not committed
            early = http.post("/tasks", json={"poll_url": "https://x.example/e"}).json()
            assert stream.next_event()["task_id"] == early["task_id"]
            time.sleep(0.5)  # a few polls pass over the uncommitted event
            slow.commit()
        assert stream.next_event() == {"task_id": str(late), "status": "pending",
                                       "user_id": None}
        stream.close()


def test_progress_reported_by_callbacks_reaches_events_however_changes_are_followed(
        pooled: Arrangement, api) -> None:
    """Progress from the edge's callback route and from update_task with the callback
    token is a change on /events, with LISTEN or without (read back from task_events);
    a report that changes nothing is not, and a status change is one event, not two."""
    with serve_edge(pooled.database_url, **pooled.settings) as edge, edge.client() as http:
        task = http.post("/tasks", json={}).json()  # no poll_url: it waits for reports
        task_id, token = task["task_id"], task["callback_token"]
        stream = Listener(edge.url, API_KEY)
        stream.wait_connected()
        with edge.client(token=None) as third_party:
            assert third_party.post(f"/callbacks/{task_id}", params={"token": token},
                                    json={"progress": 40}).status_code == 200
            for _ in range(2):  # the second one changes nothing
                api.rpc("anon", "update_task", task_id=task_id, progress=70,
                        progress_message="almost", callback_token=token)
            assert third_party.post(f"/callbacks/{task_id}", params={"token": token},
                                    json={"status": "completed"}).status_code == 200
        marker = http.post("/tasks", json={}).json()["task_id"]

        events = [stream.next_event() for _ in range(4)]
        stream.close()
    assert [(e["task_id"], e["status"]) for e in events] == [
        (task_id, "pending"), (task_id, "pending"), (task_id, "completed"), (marker, "pending")]
