"""A completion callback the network policy refuses is loud: a warning with the task id,
host and reason, a counter by reason on the worker's /metrics, and the given-up event
on the task; and nothing reaches the refused host."""

from __future__ import annotations

import httpx

from tests.factories import create_task, events
from tests.remote_api import start_receiver
from tests.worker_harness import start_worker_process, wait_until
from worker.devtools.pgcluster import free_port


def _scrape(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return None


def test_a_refused_callback_is_logged_counted_and_on_the_task(database_url, conn) -> None:
    receiver = start_receiver()
    port = free_port()
    # The setup: 127.0.0.1 allowed, the callback (n8n's resume URL) on localhost.
    worker = start_worker_process(database_url, "--metrics-port", str(port),
                                  TASKMAN_ALLOW_PRIVATE_NETWORKS="false",
                                  TASKMAN_ALLOWED_HOSTS="127.0.0.1")
    try:
        callback_url = receiver.url("/webhook-waiting/7", host="localhost")
        task_id = create_task(conn, poll_url=None, callback_url=callback_url)["task_id"]
        conn.execute("select taskman.update_task(%s, 'completed')", (task_id,))

        given_up = wait_until(lambda: [e for e in events(conn, task_id)
                                       if e["event_type"] == "notification_given_up"])
        metrics = wait_until(lambda: (text := _scrape(port)) and "callbacks_refused" in text
                             and text)
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
        receiver.stop()

    assert given_up[0]["detail"]["reason"] == "blocked_by_network_policy"
    assert given_up[0]["detail"]["channel"] == "callback"
    assert 'taskman_worker_callbacks_refused_total{reason="non_public_address"} 1.0' in metrics
    [line] = [line for line in stderr.splitlines() if "refused by the network policy" in line]
    assert "WARNING" in line and task_id in line and "host localhost" in line
    assert "non_public_address" in line
    assert receiver.hits() == []
