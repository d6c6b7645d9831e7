"""``taskman hosts`` and ``taskman hosts reset``, run as a user runs them."""

from __future__ import annotations

import json

from tests.factories import create_task
from tests.test_cli import taskman

HOST = "https://api.example.com:443"


def test_hosts_lists_an_open_circuit_and_reset_closes_it(database_url, conn) -> None:
    ids = [create_task(conn, poll_url=f"https://api.example.com/jobs/{i}")["task_id"]
           for i in range(3)]
    outcomes = [{"host": HOST, "result": "failure", "error": "http_503"}] * 3
    conn.execute("select taskman.record_host_outcomes('w', %s, 3, 60, 600)",
                 (json.dumps(outcomes),))
    parked = conn.execute("select min(next_poll_at) > now() + interval '20 seconds' as later"
                          " from taskman_private.task_schedule where task_id = any(%s)",
                          (ids,)).fetchone()
    assert parked["later"]  # waiting for the probe, a cool-down away

    listed = taskman(database_url, "hosts")
    assert listed.returncode == 0, listed.stderr
    assert "TASKS_WAITING" in listed.stdout and HOST in listed.stdout and "open" in listed.stdout
    [shown] = json.loads(taskman(database_url, "hosts", "--json").stdout)
    assert (shown["state"], shown["tasks_waiting"], shown["last_error"]) == ("open", 3, "http_503")

    reset = taskman(database_url, "hosts", "reset", "https://api.example.com/jobs/1")
    assert reset.returncode == 0, reset.stderr
    assert f"{HOST}: circuit closed" in reset.stdout
    row = conn.execute("select state, consecutive_failures from taskman_private.hosts").fetchone()
    assert (row["state"], row["consecutive_failures"]) == ("closed", 0)
    resumed = conn.execute("select max(next_poll_at) <= now() + interval '6 seconds' as soon"
                           " from taskman_private.task_schedule where task_id = any(%s)",
                           (ids,)).fetchone()
    assert resumed["soon"]
    events = [r["payload"]["event"] for r in conn.execute(
        "select payload from taskman_private.outbox where task_id is null order by outbox_id")]
    assert events == ["opened", "closed"]
    assert "no host is failing" in taskman(database_url, "hosts").stdout


def test_hosts_reset_refuses_bad_input_with_exit_2_and_changes_nothing(database_url,
                                                                      conn) -> None:
    for bad in ("api.example.com", "https://unknown.example.com", "https://", "x" * 2000):
        result = taskman(database_url, "hosts", "reset", bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "taskman hosts" in result.stderr
    assert conn.execute("select count(*) as n from taskman_private.hosts").fetchone()["n"] == 0
