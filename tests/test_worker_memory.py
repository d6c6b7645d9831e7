"""One user's tasks, every size limit at its maximum, cannot grow the worker without bound."""

from __future__ import annotations

from pathlib import Path

from tests.remote_api import Reply
from tests.worker_harness import start_worker_process, wait_until

TASKS = 1_000
LIMIT_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_tasks_at_every_size_limit_keep_the_worker_under_300_mb(
        conn, database_url, remote) -> None:
    # Every task has its own profile (16 KiB of values), a 64 KiB body and metadata and
    # 8 KiB of headers; every answer is a 256 KiB "still running".
    url = remote.script("/big", Reply(json={"status": "running", "log": "x" * 256_000}))
    conn.execute(
        "insert into taskman.tasks (poll_url, poll_method, poll_interval_seconds, poll_config,"
        " poll_body, metadata, poll_headers)"
        " select %(url)s, 'POST', 3600,"
        "  jsonb_build_object('completed_values', (select jsonb_agg(format('%%s-%%s', t, v))"
        "                                          from generate_series(1, 1300) v)),"
        "  jsonb_build_object('blob', repeat('b', 65000)),"
        "  jsonb_build_object('note', repeat('m', 65000)),"
        "  jsonb_build_object('X-Pad', repeat('h', 8000))"
        " from generate_series(1, %(tasks)s) t", {"url": url, "tasks": TASKS})
    sizes = conn.execute("select max(octet_length(poll_config::text)) as config,"
                         " max(octet_length(poll_body::text)) as body from taskman.tasks"
                         ).fetchone()
    assert sizes["config"] > 15_000 and sizes["body"] > 64_000

    worker = start_worker_process(database_url, TASKMAN_CONCURRENCY="100")
    peak = 0.0

    def all_polled() -> bool:
        nonlocal peak
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        peak = max(peak, rss_mb(worker.pid))
        polled = conn.execute("select count(*) filter (where attempt_count > 0) as n"
                              " from taskman.tasks").fetchone()["n"]
        return polled == TASKS

    try:
        wait_until(all_polled, timeout=120, interval=0.1)
    finally:
        worker.terminate()
        worker.wait(30)
    assert peak < LIMIT_MB, f"the worker reached {peak:.0f} MB"
