"""The worker against real remote APIs on 127.0.0.1 and a real database, run in-process."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import threading
import time
from contextlib import suppress

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.factories import create_task, events, schedule_row, task_row
from tests.remote_api import Reply, remote_api
from tests.worker_harness import running_worker, wait_until
from worker.devtools.pgcluster import Cluster, default_bin_dir
from worker.migrate import migrate
from worker.polling.loop import PeriodicJob

DONE = Reply(json={"status": "done", "result": {"url": "https://files.example.com/r.pdf"}})


def ended(conn: psycopg.Connection, task_id: str) -> dict:
    """The task's row once it is terminal."""
    def probe() -> dict | None:
        row = task_row(conn, task_id)
        return row if row["status"] in ("completed", "failed", "cancelled") else None
    return wait_until(probe)


def private_detail(conn: psycopg.Connection, task_id: str) -> dict:
    return conn.execute("select * from taskman_private.task_private where task_id = %s",
                        (task_id,)).fetchone()


def test_a_task_done_on_its_first_poll_completes_with_the_result(conn, database_url,
                                                                   remote) -> None:
    url = remote.script("/jobs/1", DONE)
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, poll_headers={"X-Api-Key": "secret"})["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["result"], row["progress"]) == (
        "completed", {"url": "https://files.example.com/r.pdf"}, 100)
    assert row["attempt_count"] == 1
    assert schedule_row(conn, task_id)["lease_owner"] is None
    (hit,) = remote.hits("/jobs/1")
    assert hit.headers["X-Api-Key"] == "secret"


def test_a_running_task_shows_progress_then_completes(conn, database_url, remote) -> None:
    url = remote.script(
        "/jobs/2",
        Reply(json={"status": "running", "progress": 30, "message": "rendering"}),
        Reply(json={"status": "running", "progress": 60, "message": "encoding"}),
        DONE,
    )
    seen = set()
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, poll_interval_seconds=1)["task_id"]

        def probe() -> bool:
            row = task_row(conn, task_id)
            seen.add((row["status"], row["progress"], row["progress_message"]))
            return row["status"] == "completed"

        wait_until(probe)
    assert ("in_progress", 30, "rendering") in seen
    assert ("in_progress", 60, "encoding") in seen
    changes = [(e["from_status"], e["to_status"]) for e in events(conn, task_id)
               if e["event_type"] == "status_changed"]
    assert changes == [("pending", "in_progress"), ("in_progress", "completed")]


def test_a_remote_failure_fails_the_task_with_a_neutral_message(conn, database_url,
                                                                remote) -> None:
    url = remote.script("/jobs/3", Reply(json={"status": "failed",
                                               "error": "OOM on node gpu-7 /srv/secret"}))
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "remote_failed")
    assert row["error_message"] == "The remote job reported that it failed."
    assert "gpu-7" not in str(row) and "gpu-7" not in str(events(conn, task_id))
    assert private_detail(conn, task_id)["last_error"] == "OOM on node gpu-7 /srv/secret"


def test_timeouts_server_errors_and_garbage_are_retried_until_the_task_completes(
        conn, database_url, remote) -> None:
    url = remote.script("/jobs/4", Reply(delay=2, json={"status": "done"}),
                        Reply(500, body=b"upstream exploded"), Reply(body=b"<html>oops"), DONE)
    with running_worker(database_url, TASKMAN_POLL_TIMEOUT="0.5"):
        task_id = create_task(conn, poll_url=url)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["attempt_count"], row["error_count"]) == ("completed", 4, 0)
    kinds = [e["event_type"] for e in events(conn, task_id)]
    assert kinds.count("retry_scheduled") == 3


def test_a_task_failing_beyond_max_attempts_fails_with_max_attempts(conn, database_url,
                                                                    remote) -> None:
    url = remote.script("/jobs/5", Reply(503, body=b"down"))
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, max_attempts=3)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"], row["attempt_count"]) == (
        "failed", "max_attempts", 3)
    assert len(remote.hits("/jobs/5")) == 3


def test_a_task_whose_status_url_is_not_found_fails_at_once(conn, database_url,
                                                            remote) -> None:
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=remote.url("/missing"))["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"], row["attempt_count"]) == (
        "failed", "poll_error", 1)
    assert "HTTP 404" in row["error_message"]


def test_retry_after_on_429_delays_the_next_poll(conn, database_url, remote) -> None:
    url = remote.script("/jobs/6", Reply(429, headers={"Retry-After": "3"}), DONE)
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url)["task_id"]
        ended(conn, task_id)
    first, second = remote.hits("/jobs/6")
    assert second.at - first.at >= 3.0


@pytest.mark.parametrize(("task_type", "replies", "result"), [
    ("generic", [Reply(json={"state": "processing"}),
                 Reply(json={"state": "succeeded", "output": [1, 2]})], [1, 2]),
    ("celery", [Reply(json={"task_id": "c1", "status": "STARTED", "info": {"progress": 50}}),
                Reply(json={"task_id": "c1", "status": "SUCCESS", "result": 42})], 42),
    ("standard", [Reply(json={"status": "running", "progress": 10}),
                  Reply(json={"status": "ok", "data": {"rows": 3}})], {"rows": 3}),
    ("http", [Reply(202, headers={"Retry-After": "1"}),
              Reply(303, headers={"Location": "/results/7"})], {"rows": 7}),
])
def test_each_builtin_profile_reads_its_contract_to_completion(
        conn, database_url, remote, task_type, replies, result) -> None:
    url = remote.script("/jobs/7", *replies)
    remote.script("/results/7", Reply(json={"rows": 7}))
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, task_type=task_type,
                              poll_interval_seconds=1)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["result"]) == ("completed", result)
    assert row["started_at"] is not None  # it was seen running first


def test_poll_config_overrides_the_status_and_result_paths(conn, database_url, remote) -> None:
    url = remote.script("/jobs/8", Reply(json={"job": {"phase": "done"},
                                               "files": [{"href": "/r/8.csv"}]}))
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, poll_config={
            "status_path": "job.phase", "result_path": "files[0].href"})["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["result"]) == ("completed", "/r/8.csv")


def test_poll_method_and_body_are_sent(conn, database_url, remote) -> None:
    url = remote.script("/jobs/9", DONE)
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, poll_method="POST",
                              poll_body={"job": 9})["task_id"]
        ended(conn, task_id)
    (hit,) = remote.hits("/jobs/9")
    assert (hit.method, hit.body, hit.headers["Content-Type"]) == (
        "POST", b'{"job": 9}', "application/json")


def test_tasks_pointing_at_private_addresses_are_refused(conn, database_url, remote) -> None:
    remote.script("/jobs/10", DONE)
    urls = [remote.url("/jobs/10"), "http://10.0.0.1/status", "http://169.254.169.254/latest",
            remote.url("/jobs/10", host="[::1]"), remote.url("/jobs/10", host="localhost")]
    with running_worker(database_url, TASKMAN_ALLOW_PRIVATE_NETWORKS="false"):
        tasks = [create_task(conn, poll_url=url)["task_id"] for url in urls]
        rows = [ended(conn, task_id) for task_id in tasks]
    for row in rows:
        assert (row["status"], row["error_code"]) == ("failed", "poll_error")
        assert "non-public address" in row["error_message"]
        assert "TASKMAN_ALLOW_PRIVATE_NETWORKS" in row["error_message"]
    assert remote.hits("/jobs/10") == []


@pytest.mark.parametrize("target", ["http://localhost:{port}/jobs/done",
                                    "http://10.0.0.1/jobs/done",
                                    "http://[::1]:{port}/jobs/done"])
def test_a_redirect_to_a_private_address_is_refused(conn, database_url, remote,
                                                    target) -> None:
    url = remote.script("/jobs/11", Reply(302, headers={"Location": target}))
    remote.script("/jobs/done", DONE)
    with running_worker(database_url, TASKMAN_ALLOW_PRIVATE_NETWORKS="false",
                        TASKMAN_ALLOWED_HOSTS="127.0.0.1"):
        task_id = create_task(conn, poll_url=url)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "poll_error")
    assert "non-public address" in row["error_message"]
    assert len(remote.hits("/jobs/11")) == 1 and remote.hits("/jobs/done") == []


def test_task_headers_do_not_follow_a_redirect_to_another_origin(conn, database_url,
                                                                 remote) -> None:
    url = remote.script("/jobs/12", Reply(307, headers={"Location": "/jobs/12b"}))
    remote.script("/jobs/12b", Reply(302, headers={
        "Location": "http://localhost:{port}/jobs/12c"}))
    remote.script("/jobs/12c", DONE)
    with running_worker(database_url):
        task_id = create_task(conn, poll_url=url, poll_headers={"X-Api-Key": "k"})["task_id"]
        assert ended(conn, task_id)["status"] == "completed"
    assert remote.hits("/jobs/12b")[0].headers["X-Api-Key"] == "k"  # same origin
    assert "X-Api-Key" not in remote.hits("/jobs/12c")[0].headers


def test_an_oversized_answer_counts_as_unreadable(conn, database_url, remote) -> None:
    url = remote.script("/jobs/13", Reply(json={"status": "done", "result": "x" * 5000}))
    with running_worker(database_url, TASKMAN_MAX_RESPONSE_BYTES="1024"):
        task_id = create_task(conn, poll_url=url, max_attempts=1)["task_id"]
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "invalid_response")
    assert "exceeded 1024 bytes" in private_detail(conn, task_id)["last_error"]


def test_an_answer_the_database_refuses_fails_alone_as_unreadable(conn, database_url,
                                                                  remote) -> None:
    bad = remote.script("/jobs/14", Reply(body=b'{"status": "done", "result": "a\\u0000b"}'))
    good = remote.script("/jobs/15", DONE)
    with running_worker(database_url):
        conn.execute("insert into taskman.tasks (poll_url, max_attempts) values (%s, 1), (%s, 1)",
                     (bad, good))
        ids = {r["poll_url"]: str(r["task_id"]) for r in conn.execute(
            "select task_id, poll_url from taskman.tasks")}
        bad_row, good_row = ended(conn, ids[bad]), ended(conn, ids[good])
    assert (bad_row["status"], bad_row["error_code"]) == ("failed", "invalid_response")
    assert good_row["status"] == "completed"


def test_a_result_over_what_a_task_holds_fails_alone_and_says_why(conn, database_url,
                                                                   remote) -> None:
    # Answers up to 4 MiB are read; a result holds at most 1 MiB.
    big = remote.script("/jobs/16", Reply(json={"status": "done", "result": "é" * 600_000}))
    small = remote.script("/jobs/17", Reply(json={"status": "done", "result": "é" * 500_000}))
    good = remote.script("/jobs/18", DONE)
    with running_worker(database_url, TASKMAN_MAX_RESPONSE_BYTES=str(4 * 1_048_576)):
        conn.execute("insert into taskman.tasks (poll_url, max_attempts)"
                     " values (%s, 1), (%s, 1), (%s, 1)", (big, small, good))
        ids = {r["poll_url"]: str(r["task_id"]) for r in conn.execute(
            "select task_id, poll_url from taskman.tasks")}
        rows = {url: ended(conn, task_id) for url, task_id in ids.items()}
    assert (rows[big]["status"], rows[big]["error_code"]) == ("failed", "invalid_response")
    assert "its result is 1,200,002 bytes of JSON, over the 1,048,576 a task holds" in \
        private_detail(conn, ids[big])["last_error"]
    # Under the limit in UTF-8 (though not as escaped JSON text): stored.
    assert rows[small]["status"] == "completed" and rows[small]["result"] == "é" * 500_000
    assert rows[good]["status"] == "completed"


def test_an_overdue_task_fails_with_timeout_without_being_polled(conn, database_url) -> None:
    task_id = create_task(conn, poll_url=None)["task_id"]  # waits for a callback
    conn.execute("update taskman.tasks set deadline_at = now() - interval '1 second'"
                 " where task_id = %s", (task_id,))
    with running_worker(database_url):
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "timeout")


def test_extra_periodic_jobs_run_beside_polling(database_url) -> None:
    rounds = []

    async def probe(conn: psycopg.AsyncConnection) -> None:
        rounds.append((await (await conn.execute("select 1")).fetchone())[0])

    with running_worker(database_url, jobs=[PeriodicJob("probe", 0.05, probe)]):
        wait_until(lambda: len(rounds) >= 3)


def test_a_job_round_that_outlives_its_cancellation_still_lets_the_worker_stop(
        database_url) -> None:
    """On Python 3.11 a task cancelled just as the pool hands it a connection is not
    cancelled (asyncio.wait_for returns the connection), so a job may finish its round
    after shutdown began. The worker must stop after that round, not sleep until the
    next one (here ten minutes away)."""
    started = threading.Event()

    async def round_that_ignores_cancellation(conn: psycopg.AsyncConnection) -> None:
        started.set()
        with suppress(asyncio.CancelledError):
            await asyncio.sleep(1)

    with running_worker(database_url, jobs=[PeriodicJob("stubborn", 600,
                                                        round_that_ignores_cancellation)]):
        assert started.wait(10)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5


def test_the_worker_carries_on_after_a_database_restart(remote) -> None:
    cluster = Cluster(default_bin_dir()).start()
    try:
        url = cluster.url()
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn, \
                running_worker(url):
            before = create_task(conn, poll_url=remote.script("/jobs/16", DONE))["task_id"]
            assert ended(conn, before)["status"] == "completed"

            cluster.process.send_signal(signal.SIGINT)  # fast shutdown: drops every client
            cluster.process.wait()
            log = (cluster.root / "postgres.log").open("ab")
            cluster.process = subprocess.Popen(cluster.process.args, stdout=log, stderr=log,
                                               user=cluster.user)
            cluster._wait_ready()

            with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn2:
                after = create_task(conn2, poll_url=remote.script("/jobs/17", DONE))["task_id"]
                assert ended(conn2, after)["status"] == "completed"
    finally:
        cluster.stop()


def test_a_costly_expression_fails_its_task_while_its_neighbours_complete(
        conn, database_url, remote) -> None:
    big = {"status": "done", "items": [{"id": i} for i in range(2000)]}
    costly = remote.script("/costly", Reply(json=big))
    # Within the static bounds (no projection at all), but written out it doubles 50 times.
    config = {"result_path": "[@,@]|" * 50 + "@"}
    with remote_api() as other_host:
        healthy = [other_host.script(f"/h/{i}", DONE) for i in range(20)]
        with running_worker(database_url):
            task_id = create_task(conn, poll_url=costly, poll_config=config)["task_id"]
            neighbours = [create_task(conn, poll_url=url.replace("127.0.0.1", "localhost"))
                          ["task_id"] for url in healthy]
            row = ended(conn, task_id)
            assert all(ended(conn, n)["status"] == "completed" for n in neighbours)
    assert (row["status"], row["error_code"], row["attempt_count"]) == (
        "failed", "invalid_response", 1)
    assert "evaluation budget" in row["error_message"]
    assert "result_path" in row["error_message"]
    polled = [e for e in events(conn, task_id) if e["event_type"] == "polled"]
    assert polled[0]["detail"]["reason"] == "evaluation_budget"


def test_an_expression_stored_before_the_bounds_is_refused_without_polling(
        conn, database_url, remote) -> None:
    url = remote.script("/old", DONE)
    task_id = create_task(conn, poll_url=url)["task_id"]
    conn.execute("set session_replication_role = replica")  # as written before the checks
    conn.execute("update taskman.tasks set poll_config = %s where task_id = %s",
                 (Jsonb({"status_path": "[@,@][]" * 30}), task_id))
    conn.execute("reset session_replication_role")
    with running_worker(database_url):
        row = ended(conn, task_id)
    assert (row["status"], row["error_code"]) == ("failed", "invalid_response")
    assert "status_path has 30 projections" in row["error_message"]
    assert remote.hits("/old") == []


def test_a_remote_that_always_says_now_gets_at_most_one_poll_a_second(
        conn, database_url, remote) -> None:
    url = remote.script("/hot", Reply(202, json={"status": "running"},
                                      headers={"Retry-After": "0"}))
    with running_worker(database_url, TASKMAN_MIN_POLL_INTERVAL="1"):
        create_task(conn, poll_url=url, poll_interval_seconds=5)
        wait_until(lambda: remote.hits("/hot"))
        time.sleep(3.2)
    hits = [h.at for h in remote.hits("/hot")]
    assert 3 <= len(hits) <= 5
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(hits))


def test_polls_to_one_host_stay_within_its_limit_while_other_hosts_go_on(
        conn, database_url, remote) -> None:
    slow = remote.script("/slow", Reply(json={"status": "done"}, delay=0.4))
    fast = remote.script("/fast", Reply(json={"status": "done"}))
    slow_ids = [create_task(conn, poll_url=slow)["task_id"] for _ in range(6)]
    # The same server under another name: another host as far as limits go.
    fast_ids = [create_task(conn, poll_url=fast.replace("127.0.0.1", "localhost"))["task_id"]
                for _ in range(6)]
    with running_worker(database_url, TASKMAN_PER_HOST_CONCURRENCY="2"):
        for task_id in slow_ids + fast_ids:
            ended(conn, task_id)
    arrivals = sorted(hit.at for hit in remote.hits("/slow"))
    assert len(arrivals) == 6
    # At most two polls to the slow host at a time: each third poll waited for a slot.
    assert all(later - earlier >= 0.35
               for earlier, later in zip(arrivals, arrivals[2:], strict=False))
    fast_done = max(hit.at for hit in remote.hits("/fast"))
    assert fast_done < arrivals[-1]  # the other host did not queue behind the slow one
