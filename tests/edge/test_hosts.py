"""Remote hosts at the edge: GET /hosts for the service and for users (per-host /metrics:
test_metrics_token.py)."""

from __future__ import annotations

import json
import uuid

import psycopg


def fail_host(db: psycopg.Connection, host: str, times: int = 1, threshold: int = 1) -> None:
    """Record `times` failures of `host` as a worker would (one batch)."""
    outcomes = [{"host": host, "result": "failure", "error": "http_503"}] * times
    db.execute("select taskman.record_host_outcomes('w', %s, %s)",
               (json.dumps(outcomes), threshold))


def test_hosts_lists_open_circuits_and_limits_with_the_tasks_waiting(service, alice, bob,
                                                                     db) -> None:
    name = f"h{uuid.uuid4().hex[:8]}.example.com"
    down, limited = f"https://{name}:443", f"https://limited-{name}:443"
    for user, url in ((alice, f"https://{name}/1"), (alice, f"https://{name}/2"),
                      (bob, f"https://{name}/3"), (bob, f"https://limited-{name}/1")):
        assert user.http.post("/tasks", json={"poll_url": url}).status_code == 201
    fail_host(db, down)
    db.execute("select taskman.set_host_limits(%s)", (json.dumps({limited: 5}),))

    everything = {h["host"]: h for h in service.get("/hosts").json()}
    assert (everything[down]["state"], everything[down]["tasks_waiting"]) == ("open", 3)
    assert everything[down]["last_error"] == "http_503" and everything[down]["since"]
    assert (everything[limited]["rate_limit"], everything[limited]["tasks_waiting"]) == (5, 1)

    mine = alice.http.get("/hosts").json()
    assert [(h["host"], h["tasks_waiting"]) for h in mine] == [(down, 2)]
