"""Per-host /metrics name every user's remote hosts: an edge serves them only behind
TASKMAN_METRICS_TOKEN, and without the token it serves the other series to anyone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.edge.conftest import API_KEY, Edge, serve_edge

METRICS_TOKEN = "scrape-the-hosts"
HOST_SERIES = ("taskman_host_circuit_open", "taskman_host_paused",
               "taskman_host_consecutive_failures", "taskman_host_failures_total",
               "taskman_host_throttled_total", "taskman_host_tasks_waiting",
               "taskman_host_rate_limit")


@pytest.fixture(scope="module")
def guarded(edge_database_url: str) -> Iterator[Edge]:
    """An edge of the same database with TASKMAN_METRICS_TOKEN set."""
    with serve_edge(edge_database_url, TASKMAN_METRICS_TOKEN=METRICS_TOKEN) as server:
        yield server


def _known_host(edge: Edge, alice) -> str:
    """A host a user's live task waits on, with failures, a throttle count and a limit."""
    name = f"m{uuid.uuid4().hex[:8]}.example.com"
    assert alice.http.post("/tasks", json={"poll_url": f"https://{name}/job/1"}).status_code == 201
    host = f"https://{name}:443"
    with psycopg.connect(edge.database_url, autocommit=True, row_factory=dict_row) as db:
        db.execute(
            "insert into taskman_private.hosts (host, state, opened_at, consecutive_failures,"
            " failures_total, throttled_total, rate_limit, last_error)"
            " values (%s, 'open', now(), 4, 4, 7, 5, 'http_503')"
            " on conflict (host) do update set state = 'open', opened_at = now(),"
            " consecutive_failures = 4, failures_total = 4, throttled_total = 7,"
            " rate_limit = 5", (host,))
    return host


def test_without_a_token_no_host_is_named_to_anyone(edge, alice) -> None:
    host = _known_host(edge, alice)
    for token in (None, API_KEY, "anything"):
        with edge.client(token=token) as client:
            response = client.get("/metrics")
        assert response.status_code == 200
        assert 'taskman_tasks{status="pending"}' in response.text  # the rest is served
        assert host not in response.text
        assert not [s for s in HOST_SERIES if s in response.text]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Bearer {API_KEY}",
                                           METRICS_TOKEN, f"Basic {METRICS_TOKEN}",
                                           f"Bearer {METRICS_TOKEN}x",
                                           f"Bearer {METRICS_TOKEN[:-1]}"],
                         ids=["none", "wrong", "api-key", "no-scheme", "basic", "longer",
                              "prefix"])
def test_with_a_token_hosts_are_refused_without_it(guarded, alice, authorization) -> None:
    host = _known_host(guarded, alice)
    headers = {"Authorization": authorization} if authorization else {}
    with guarded.client(token=None) as client:
        response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "unauthorized"
    assert host not in response.text


def test_with_the_token_every_host_series_is_served(guarded, alice) -> None:
    host = _known_host(guarded, alice)
    with guarded.client(token=METRICS_TOKEN) as client:
        text = client.get("/metrics").text

    label = f'{{host="{host}"}}'
    assert f"taskman_host_circuit_open{label} 1.0" in text
    assert f"taskman_host_consecutive_failures{label} 4.0" in text
    assert f"taskman_host_failures_total{label} 4.0" in text
    assert f"taskman_host_throttled_total{label} 7.0" in text
    assert f"taskman_host_tasks_waiting{label} 1.0" in text
    assert f"taskman_host_rate_limit{label} 5.0" in text
