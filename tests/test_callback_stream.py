"""Callbacks as fast as completions: a worker process sends a task's callback moments after
it ends (woken by the outbox's NOTIFY, or checking often behind a transaction pooler),
drains a burst without waiting for ticks, keeps a slow receiver from holding up the
others, keeps each task's callbacks in order, and loses nothing when it is killed."""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from tests.factories import create_task
from tests.remote_api import RemoteAPI, Reply, remote_api, start_receiver
from tests.test_outbox import SECRET, delivery_events, dispatch, end_task, make_due, make_settings
from tests.worker_harness import exit_code, start_worker_process, wait_until
from worker.notify.completion_callbacks import verify_signature

WORKER_ENV = {"TASKMAN_CALLBACK_SECRET": SECRET}


@pytest.fixture
def hook() -> Iterator[RemoteAPI]:
    receiver = start_receiver(answer={"received": True})
    yield receiver
    receiver.stop()


def listening(conn: psycopg.Connection) -> int:
    return conn.execute(
        "select count(*) as n from pg_stat_activity where datname = current_database()"
        " and application_name = 'taskman-worker-listen'").fetchone()["n"]


def callback_tasks(conn: psycopg.Connection, urls: list[str]) -> list[str]:
    """Tasks that wait for a report (nothing to poll), each with a callback URL."""
    rows = conn.execute(
        "insert into taskman.tasks (callback_url) select unnest(%s::text[]) returning task_id",
        (urls,)).fetchall()
    return [str(r["task_id"]) for r in rows]


def complete_all(conn: psycopg.Connection, task_ids: list[str]) -> None:
    conn.execute("select taskman.update_task(t, 'completed') from unnest(%s::uuid[]) t",
                 (task_ids,))


def undelivered(conn: psycopg.Connection) -> int:
    return conn.execute("select count(*) as n from taskman_private.outbox"
                        " where delivered_at is null").fetchone()["n"]


def test_an_idle_worker_sends_a_callback_moments_after_the_task_ends(
        conn, database_url, hook, workers) -> None:
    workers.append(start_worker_process(database_url, **WORKER_ENV))
    wait_until(lambda: listening(conn))
    latencies = []
    for i in range(5):
        [task_id] = callback_tasks(conn, [hook.url(f"/done/{i}")])
        time.sleep(0.3)  # idle again: nothing due, no tick about to come
        ended = time.monotonic()
        end_task(conn, task_id, "completed")
        [hit] = wait_until(lambda i=i: hook.hits(f"/done/{i}"), timeout=5, interval=0.002)
        latencies.append(hit.at - ended)
        assert hit.json()["task_id"] == task_id and hit.json()["status"] == "completed"
        assert verify_signature(SECRET, hit.headers["X-Taskman-Timestamp"], hit.body,
                                hit.headers["X-Taskman-Signature"])

    # Once a second, as before, would make the median about half a second.
    assert statistics.median(latencies) < 0.2, latencies
    wait_until(lambda: undelivered(conn) == 0)


def test_behind_a_transaction_pooler_without_listen_callbacks_still_go_out(
        conn, database_url, hook, workers) -> None:
    workers.append(start_worker_process(
        database_url, TASKMAN_DATABASE_POOL_MODE="transaction",
        TASKMAN_CHANGE_CHECK_INTERVAL="0.2", **WORKER_ENV))
    task_ids = callback_tasks(conn, [hook.url(f"/t/{i}") for i in range(3)])
    time.sleep(1)  # the worker is up and idle
    assert listening(conn) == 0

    started = time.monotonic()
    complete_all(conn, task_ids)
    hits = wait_until(lambda: len(hook.hits()) == 3 and hook.hits(), timeout=10)

    assert max(h.at for h in hits) - started < 2
    assert sorted(h.json()["task_id"] for h in hits) == sorted(task_ids)
    wait_until(lambda: undelivered(conn) == 0)


def test_two_workers_share_a_burst_and_deliver_each_callback_once(
        conn, database_url, hook, workers) -> None:
    workers.extend(start_worker_process(database_url, TASKMAN_OUTBOX_BATCH_SIZE="50",
                                        **WORKER_ENV) for _ in range(2))
    wait_until(lambda: listening(conn) == 2)
    task_ids = callback_tasks(conn, [hook.url(f"/burst/{i}") for i in range(400)])

    complete_all(conn, task_ids)

    wait_until(lambda: undelivered(conn) == 0, timeout=30)
    hits = hook.hits()
    assert Counter(h.json()["task_id"] for h in hits) == Counter(task_ids)  # each once
    assert len({h.headers["X-Taskman-Delivery"] for h in hits}) == 400
    [(kinds, n)] = Counter(
        tuple(e["event_type"] for e in delivery_events(conn, t)) for t in task_ids).items()
    assert (kinds, n) == (("notification_delivered",), 400)


def test_a_slow_receiver_does_not_hold_up_callbacks_to_others(conn, database_url,
                                                              workers) -> None:
    with remote_api(Reply(200, json={"ok": True}, delay=3)) as slow, \
            remote_api(Reply(200, json={"ok": True})) as fast:
        workers.append(start_worker_process(
            database_url, TASKMAN_CONCURRENCY="20", TASKMAN_PER_HOST_CONCURRENCY="4",
            TASKMAN_OUTBOX_BATCH_SIZE="20", **WORKER_ENV))
        wait_until(lambda: listening(conn))
        stuck = callback_tasks(conn, [slow.url(f"/slow/{i}") for i in range(100)])
        complete_all(conn, stuck)
        wait_until(lambda: len(slow.hits()) >= 4)  # the slow host's share is busy

        [other] = callback_tasks(conn, [fast.url("/fast")])
        ended = time.monotonic()
        end_task(conn, other, "completed")
        [hit] = wait_until(lambda: fast.hits("/fast"), timeout=10, interval=0.005)

        assert hit.at - ended < 1.0  # not behind 100 callbacks taking 3 s, 4 at a time
        assert len(slow.hits()) <= 8  # and the slow host never had more than its limit


def test_a_tasks_callbacks_arrive_in_order_even_when_the_first_is_retried(
        conn, database_url, hook) -> None:
    task = create_task(conn, poll_url=None, callback_url=hook.url("/ordered"))
    end_task(conn, task["task_id"], "cancelled")
    conn.execute("select taskman.retry_task(%s)", (task["task_id"],))
    end_task(conn, task["task_id"], "completed")
    hook.status = 500

    assert dispatch(database_url, make_settings()).claimed == 1  # the second waits
    hook.status = 200
    make_due(conn)
    assert dispatch(database_url, make_settings()).delivered == 1
    make_due(conn)
    assert dispatch(database_url, make_settings()).delivered == 1

    statuses = [(h.status, h.json()["status"]) for h in hook.hits()]
    assert statuses == [(500, "cancelled"), (200, "cancelled"), (200, "completed")]
    ids = [int(h.headers["X-Taskman-Delivery"]) for h in hook.hits()]
    assert ids[0] == ids[1] < ids[2]  # a retry keeps its delivery id


def test_callbacks_of_a_killed_worker_are_sent_by_another_with_the_same_delivery_ids(
        conn, database_url, workers) -> None:
    with remote_api(Reply(200, json={"ok": True}, delay=0.05)) as hook:
        env = {**WORKER_ENV, "TASKMAN_LEASE_SECONDS": "5", "TASKMAN_CALLBACK_TIMEOUT": "1",
               "TASKMAN_CONCURRENCY": "10", "TASKMAN_PER_HOST_CONCURRENCY": "10",
               "TASKMAN_OUTBOX_BATCH_SIZE": "10"}
        first = start_worker_process(database_url, **env)
        workers.append(first)
        wait_until(lambda: listening(conn))
        task_ids = callback_tasks(conn, [hook.url(f"/k/{i}") for i in range(300)])
        complete_all(conn, task_ids)
        wait_until(lambda: len(hook.hits()) >= 30)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert undelivered(conn) > 0  # killed mid-burst

        workers.append(start_worker_process(database_url, **env))
        wait_until(lambda: undelivered(conn) == 0, timeout=60)

        hits = hook.hits()
    by_task: dict[str, set[str]] = {}
    for hit in hits:
        by_task.setdefault(hit.json()["task_id"], set()).add(hit.headers["X-Taskman-Delivery"])
    assert set(by_task) == set(task_ids)  # nothing lost
    assert all(len(ids) == 1 for ids in by_task.values())  # resent with the same id


def test_sigterm_mid_send_gives_unsent_callbacks_to_another_worker_at_once(
        conn, database_url, workers) -> None:
    """Sends cut off by the shutdown grace, and rows still waiting for their host, go out
    from another worker moments later, not when their lease (3 minutes here) ends; sends
    that finish within the grace are recorded and not sent again."""
    env = {**WORKER_ENV, "TASKMAN_SHUTDOWN_GRACE": "10", "TASKMAN_CALLBACK_TIMEOUT": "30",
           "TASKMAN_PER_HOST_CONCURRENCY": "4"}
    with remote_api(Reply(200, json={"ok": True}, delay=30)) as slow, \
            remote_api(Reply(200, json={"ok": True}, delay=8)) as quick:
        first = start_worker_process(database_url, "--log-format", "json", **env)
        workers.append(first)
        wait_until(lambda: listening(conn) == 1)
        cut_off = callback_tasks(conn, [slow.url(f"/slow/{i}") for i in range(6)])
        finishing = callback_tasks(conn, [quick.url(f"/quick/{i}") for i in range(3)])
        complete_all(conn, cut_off + finishing)
        # Four slow sends in flight (the host's limit), two waiting; three quick ones.
        wait_until(lambda: len(slow.hits()) == 4 and len(quick.hits()) == 3)
        workers.append(start_worker_process(database_url, **env))
        wait_until(lambda: listening(conn) == 2)
        assert undelivered(conn) == 9  # the quick ones are still in flight too

        first.send_signal(signal.SIGTERM)
        slow.default = Reply(200, json={"ok": True})  # the host recovers: sent again, it answers
        assert exit_code(first, 25) == 0
        stopped = time.monotonic()
        hits = wait_until(lambda: len(slow.hits()) == 10 and slow.hits(), timeout=30)
        wait_until(lambda: undelivered(conn) == 0)
        quick_hits = quick.hits()

    assert max(h.at for h in hits[4:]) - stopped < 5
    ids: dict[str, set[str]] = {}
    for hit in hits:
        ids.setdefault(hit.json()["task_id"], set()).add(hit.headers["X-Taskman-Delivery"])
    assert set(ids) == set(cut_off)  # nothing lost
    assert all(len(delivery_ids) == 1 for delivery_ids in ids.values())  # the same id again
    # Four cut off and sent again, two sent once; the quick ones once each.
    assert sorted(Counter(h.json()["task_id"] for h in hits).values()) == [1, 1, 2, 2, 2, 2]
    assert sorted(h.json()["task_id"] for h in quick_hits) == sorted(finishing)
    for task_id in cut_off + finishing:
        [event] = delivery_events(conn, task_id)
        assert (event["event_type"], event["detail"]["attempt"]) == (
            "notification_delivered", 1)  # giving back is not an attempt
    logs = [json.loads(line) for line in first.stderr.read().splitlines()]
    assert any("gave back 6 unsent callbacks" in entry["message"] for entry in logs)
