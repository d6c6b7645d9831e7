"""``taskman dev``: database, migrations, worker and edge in one process, for trying Taskman.

The edge runs in a thread (uvicorn leaves signals alone there); the worker runs in
the main event loop and owns shutdown: Ctrl-C stops the worker gracefully, then
the edge.
"""

from __future__ import annotations

import secrets
import socket
import sys
import threading
import time

import platformdirs
import uvicorn
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from worker import db, store
from worker.config import Settings
from worker.devtools.demo import REMOTE_PREFIX, sample_tasks
from worker.devtools.demo import remote as demo_remote
from worker.domain import TaskCreate
from worker.edge.access_log import uvicorn_log_config
from worker.edge.app import create_app
from worker.polling.metrics import WorkerMetrics
from worker.polling.service import serve_worker


def dev_api_key() -> str:
    """A per-user development API key, created once and reused, so a browser that
    saved it stays signed in across restarts."""
    path = platformdirs.user_data_path("taskman") / "dev-api-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def create_demo_tasks(conninfo: str, remote_url: str) -> int:
    """Create the demo's sample tasks unless a demo is already running; returns how many."""
    with db.connect(conninfo, autocommit=True) as conn:
        if store.live_demo_tasks(conn):
            return 0
        tasks = sample_tasks(remote_url)
        progress = sys.stdout.isatty()
        for number, args in enumerate(tasks, 1):
            store.create_task(conn, TaskCreate(**args))
            if progress:
                print(f"\r  creating demo tasks: {number}/{len(tasks)}", end="", flush=True)
        if progress:
            print()
    return len(tasks)


def _start_edge(server: uvicorn.Server, sock: socket.socket) -> threading.Thread:
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the edge did not start; see the messages above")
        time.sleep(0.05)
    return thread


def run_dev(settings: Settings, conninfo: str, host: str, port: int, demo: bool) -> None:
    """Serve edge and worker until Ctrl-C; with ``demo``, create sample tasks first."""
    key = next(iter(sorted(settings.api_keys)), None) or dev_api_key()
    local = "127.0.0.1"
    # The demo's simulated remote is served by this edge on loopback, which the
    # worker refuses by default: allow exactly that host.
    settings = settings.model_copy(update={
        "api_keys": settings.api_keys | {key},
        "allowed_hosts": settings.allowed_hosts | ({local} if demo else set()),
    })
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise SystemExit(f"taskman dev: cannot listen on {host}:{port} ({exc.strerror}); "
                         "pass --port to use another port") from None
    app = create_app(settings, conninfo)
    if demo:  # the simulated remote the demo tasks poll
        app.include_router(demo_remote)
    metrics = WorkerMetrics()  # one process: the edge's /metrics shows the worker's too
    app.state.metrics.registry.register(metrics.registry)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                                           log_config=uvicorn_log_config()))
    edge = _start_edge(server, sock)
    base = f"http://{local if host in ('0.0.0.0', '::') else host}:{sock.getsockname()[1]}"
    try:
        if demo:
            created = create_demo_tasks(conninfo, f"http://{local}:{sock.getsockname()[1]}"
                                        f"{REMOTE_PREFIX}")
            print(f"  demo: {created} sample tasks created" if created
                  else "  demo: sample tasks are already running")
        print(f"\nTaskman is running.\n  dashboard: {base}/#key={key}\n  API key:   {key}\n"
              f"  API docs:  {base}/docs\n  database:  {_redacted(conninfo)}\n"
              "Press Ctrl-C to stop.\n", flush=True)
        serve_worker(settings, conninfo, metrics)
    finally:
        server.should_exit = True
        edge.join(10)
        sock.close()


def _redacted(conninfo: str) -> str:
    """The connection string without its password, for printing."""
    parts = conninfo_to_dict(conninfo)
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo("", **parts)
