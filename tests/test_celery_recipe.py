"""The README's Celery recipe, run as written: a real Celery worker (kombu's filesystem
transport, the file result backend), the recipe's status endpoint served on 127.0.0.1,
and a real ``taskman worker`` tracking jobs that succeed, raise, retry and are revoked."""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

from tests.factories import USER_A, events
from tests.remote_api import RemoteAPI, start_receiver
from tests.worker_harness import REPO, start_worker_process, wait_until

T = TypeVar("T")

# The user's Celery app, which the recipe imports as `jobs`.
JOBS_MODULE = '''
import os

from celery import Celery

base = os.environ["CELERY_TEST_DIR"]
celery_app = Celery("jobs", broker="filesystem://", backend=f"file://{base}/results")
celery_app.conf.broker_transport_options = {
    "data_folder_in": f"{base}/queue", "data_folder_out": f"{base}/queue",
    "control_folder": f"{base}/control", "polling_interval": 0.1,
}
celery_app.conf.task_track_started = True


@celery_app.task
def add(a, b):
    return {"sum": a + b}


@celery_app.task
def explode():
    raise ValueError("secret-detail-only-in-the-traceback")


@celery_app.task(bind=True)
def flaky(self):
    if self.request.retries < 1:
        raise self.retry(countdown=1)
    return "ok after a retry"


@celery_app.task
def slow():
    return "never runs: revoked before it is sent"
'''


def readme_recipe() -> str:
    """The first Python block of the README's Celery section, exactly as written."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### A Celery status endpoint"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Celery section has no Python block"
    return match.group(1)


@dataclass
class CeleryStack:
    jobs: ModuleType
    status_url: str
    worker: subprocess.Popen
    log: Path

    def wait_for_jobs(self, probe: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
        """wait_until, and on failure what the Celery worker logged and whether it runs."""
        try:
            return wait_until(probe, timeout=timeout, interval=interval)
        except AssertionError as exc:
            state = "running" if self.worker.poll() is None else f"exited {self.worker.returncode}"
            raise AssertionError(f"{exc}; Celery worker {state}, its log:\n"
                                 f"{self.log.read_text()[-4000:]}") from None


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=15)
    return server, thread, sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryStack]:
    base = tmp_path_factory.mktemp("celery")
    for folder in ("queue", "control", "results"):
        (base / folder).mkdir()
    (base / "jobs.py").write_text(JOBS_MODULE)
    (base / "celery_status.py").write_text(readme_recipe())
    env = {**os.environ, "CELERY_TEST_DIR": str(base), "PYTHONPATH": str(base)}
    os.environ["CELERY_TEST_DIR"] = str(base)
    sys.path.insert(0, str(base))
    # Its log goes to a file: a pipe nobody reads would block the worker once full.
    log = base / "worker.log"
    with log.open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "jobs", "worker", "--pool=solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
            cwd=base, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        jobs = importlib.import_module("jobs")
        recipe = importlib.import_module("celery_status")
        server, thread, sock, url = _serve(recipe.app)
        try:
            # The worker is up once it has run a job.
            probe = jobs.add.delay(0, 0)
            wait_until(lambda: probe.state == "SUCCESS" or worker.poll() is not None, 20)
            assert worker.poll() is None, log.read_text()
            yield CeleryStack(jobs, url, worker, log)
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
        for name in ("jobs", "celery_status"):
            sys.modules.pop(name, None)
        sys.path.remove(str(base))
        os.environ.pop("CELERY_TEST_DIR", None)


@pytest.fixture
def slack() -> Iterator[RemoteAPI]:
    receiver = start_receiver(answer="ok")
    yield receiver
    receiver.stop()


def test_the_recipe_is_complete_and_its_code_is_what_the_test_runs() -> None:
    code = readme_recipe()
    assert "AsyncResult(task_id, app=celery_app)" in code
    assert '"traceback": result.traceback' in code
    assert "from celery.result import AsyncResult" in code
    assert "poll_interval_seconds" in (REPO / "README.md").read_text().split(
        "### A Celery status endpoint")[1].split("###")[0]


def test_taskman_tracks_real_celery_jobs_to_their_ends(
    celery_stack: CeleryStack, conn, api, database_url, slack
) -> None:
    jobs = celery_stack.jobs
    # Revoked before it is sent, once the worker confirms it: the worker then discards it
    # on receipt and records REVOKED, whatever order it reads its queues in.
    revoked_id = str(uuid.uuid4())
    replies = jobs.celery_app.control.revoke(revoked_id, reply=True, limit=1, timeout=15)
    assert replies, "the Celery worker did not confirm the revoke"
    jobs.slow.apply_async(task_id=revoked_id)
    celery_ids = {
        "succeeds": jobs.add.delay(2, 3).id,
        "raises": jobs.explode.delay().id,
        "retries": jobs.flaky.delay().id,
        "revoked": revoked_id,
    }
    tasks = {
        name: api.rpc("authenticated", "create_task", sub=USER_A, task_type="celery",
                      poll_url=f"{celery_stack.status_url}/tasks/{celery_id}",
                      poll_interval_seconds=1)["task_id"]
        for name, celery_id in celery_ids.items()
    }
    worker = start_worker_process(
        database_url, SLACK_WEBHOOK_URL=f"{slack.url()}/services/T000/B000/XXXX")
    try:
        def ended() -> dict[str, Any] | None:
            rows = {name: api.rpc("authenticated", "get_task_status", sub=USER_A, task_id=tid)
                    for name, tid in tasks.items()}
            done = all(r["status"] in ("completed", "failed", "cancelled") for r in rows.values())
            return rows if done else None

        seen = celery_stack.wait_for_jobs(ended, timeout=25, interval=0.2)
        wait_until(slack.hits, timeout=10)
        time.sleep(1.5)  # an alert for the revoked job would have gone out by now
    finally:
        worker.terminate()
        worker.wait(15)

    assert seen["succeeds"]["status"] == "completed"
    assert seen["succeeds"]["result"] == {"sum": 5}
    assert seen["retries"]["status"] == "completed"
    assert seen["retries"]["result"] == "ok after a retry"

    failed = seen["raises"]
    assert (failed["status"], failed["error_code"]) == ("failed", "remote_failed")
    assert failed["error_message"] == "The remote job reported that it failed."
    with api.request("authenticated", USER_A) as cur:
        cur.execute("select taskman.task_json(t) as j from taskman.tasks t where task_id = %s",
                    (tasks["raises"],))
        assert "secret-detail" not in str(cur.fetchone()["j"])
        cur.execute("select detail from taskman.task_events where task_id = %s",
                    (tasks["raises"],))
        assert "secret-detail" not in str(cur.fetchall())
    kept = conn.execute("select last_error from taskman_private.task_private where task_id = %s",
                        (tasks["raises"],)).fetchone()["last_error"]
    assert "Traceback" in kept and "secret-detail-only-in-the-traceback" in kept

    cancelled = seen["revoked"]
    assert (cancelled["status"], cancelled["error_code"]) == ("cancelled", None)
    assert cancelled["error_message"] == "The remote job was cancelled."
    assert "cancelled" in [e["event_type"] for e in events(conn, tasks["revoked"])]
    alerts = " ".join(hit.json()["text"] for hit in slack.hits())
    assert tasks["raises"] in alerts
    assert tasks["revoked"] not in alerts


def test_the_recipe_answers_every_state_as_json(celery_stack: CeleryStack) -> None:
    """Never a 500 (the old recipe's AsyncResult without app= answered 500 to every poll)."""
    job = celery_stack.jobs.explode.delay()
    celery_stack.wait_for_jobs(lambda: job.state == "FAILURE", timeout=15)
    answer = httpx.get(f"{celery_stack.status_url}/tasks/{job.id}", timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "FAILURE" and body["result"] is None
    assert "ValueError" in body["traceback"]
    unknown = httpx.get(f"{celery_stack.status_url}/tasks/{uuid.uuid4()}", timeout=5).json()
    assert unknown["status"] == "PENDING"

