"""A newcomer's first minutes, checked: fresh clone, `make dev`, a dashboard with demo tasks.

Runs with the system Python (standard library only), before any virtualenv exists:

    python3 scripts/first_run.py

It clones this repository into a temporary directory, runs the README's command
with a fresh HOME (so the embedded database starts from nothing), waits for the
printed dashboard link, then checks the page and that the demo tasks are moving.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 900  # the first run creates the virtualenv and installs everything
DEMO_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def wait_for_link(dev: subprocess.Popen, log: list[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    for line in dev.stdout:
        log.append(line)
        found = re.search(r"dashboard: (\S+)", line)
        if found:
            return found.group(1)
        if time.monotonic() > deadline:
            break
    raise SystemExit("first run: no dashboard link was printed\n" + "".join(log[-40:]))


def check_demo(base: str, key: str) -> dict[str, int]:
    deadline = time.monotonic() + DEMO_TIMEOUT
    while True:
        tasks = json.loads(get(f"{base}/tasks?limit=100", key))["tasks"]
        counts: dict[str, int] = {}
        for task in tasks:
            counts[task["status"]] = counts.get(task["status"], 0) + 1
        if len(tasks) >= 9 and counts.get("completed", 0) >= 3 and counts.get("failed", 0) >= 1:
            return counts
        if time.monotonic() > deadline:
            raise SystemExit(f"first run: demo tasks did not move as expected: {counts}")
        time.sleep(2)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="taskman-first-run-") as work:
        clone = Path(work) / "taskman"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        home = Path(work) / "home"
        home.mkdir()
        port = free_port()
        env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("DATABASE_URL", None)
        dev = subprocess.Popen(
            ["make", "dev", f"DEV_ARGS=--port {port}"], cwd=clone, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log: list[str] = []
        try:
            link = wait_for_link(dev, log)
            base, key = link.split("/#key=")
            page = get(f"{base}/", key).decode()
            assert "<title>Taskman</title>" in page, "the dashboard page did not load"
            counts = check_demo(base, key)
            metrics = get(f"{base}/metrics", key).decode()
            assert "taskman_worker_polls_total" in metrics, "worker metrics are not served"
            print(f"first run: dashboard at {base}/ with demo tasks {counts}")
        finally:
            os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C, as a person would
            try:
                dev.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                raise SystemExit("first run: taskman dev did not stop on Ctrl-C") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
