"""Remote hosts at the edge: GET /hosts for the service and for users, per-host /metrics."""

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


def test_metrics_export_per_host_state_failures_and_throttled(edge, db) -> None:
    host = f"https://m{uuid.uuid4().hex[:8]}.example.com:443"
    fail_host(db, host, times=4, threshold=3)
    db.execute("update taskman_private.hosts set throttled_total = 7 where host = %s", (host,))
    with edge.client(token=None) as client:
        text = client.get("/metrics").text
    label = f'{{host="{host}"}}'
    assert f"taskman_host_circuit_open{label} 1.0" in text
    assert f"taskman_host_consecutive_failures{label} 4.0" in text
    assert f"taskman_host_failures_total{label} 4.0" in text
    assert f"taskman_host_throttled_total{label} 7.0" in text
    assert f"taskman_host_tasks_waiting{label} 0.0" in text
