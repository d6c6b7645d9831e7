"""Tested by attack: generated hostile input against a real ``taskman worker`` process, its
outbox and real HTTP servers on 127.0.0.1.

For every case the hostile task ends (failed, or completed if the answer happened to be
readable), each of its polls recorded with a reason and spaced by at least the floor; a
healthy control task created beside it, on another host, completes on time; the
worker's memory stays flat; and at the end SIGTERM still stops it within its grace while
hostile polls are in flight. One worker serves the whole module.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import complete_with_unbounded_result
from tests.hostile_remote import Attack, HostileRemote, forever, once, response
from tests.remote_api import RemoteAPI, start_receiver
from tests.worker_harness import REPO, TEST_ENV, wait_until
from worker.remote.expression_limits import static_problem

FLOOR = 0.3  # TASKMAN_MIN_POLL_INTERVAL of the worker under attack
GRACE = 2.0
ON_TIME = 2.5  # seconds in which a healthy task completes, hostile neighbours or not
WORKER_ENV = {
    "TASKMAN_MIN_POLL_INTERVAL": str(FLOOR),
    "TASKMAN_RETRY_BASE": "0.3",
    "TASKMAN_RETRY_MAX": "0.6",
    "TASKMAN_POLL_TIMEOUT": "1",
    "TASKMAN_SHUTDOWN_GRACE": str(GRACE),
    "TASKMAN_OUTBOX_MAX_ATTEMPTS": "2",
    "TASKMAN_OUTBOX_RETRY_BASE": "0.2",
    "TASKMAN_OUTBOX_RETRY_MAX": "0.4",
    # Every attack comes from one host: here each task must fail or retry alone, so the
    # host's circuit (tests/test_hosts.py) stays closed however many of them fail.
    "TASKMAN_HOST_FAILURE_THRESHOLD": "1000000",
}
JSON = {"Content-Type": "application/json"}
DONE = response("200 OK", b'{"status": "done", "result": {"ok": true}}', JSON)
FEW = settings(max_examples=6, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def db(module_database_url: str) -> str:
    return module_database_url


@pytest.fixture(scope="module")
def sql(module_conn: psycopg.Connection) -> psycopg.Connection:
    return module_conn


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRemote]:
    remote = HostileRemote("127.0.0.1")
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def healthy() -> Iterator[HostileRemote]:
    remote = HostileRemote("127.0.0.2")  # another host: its own per-host limit
    remote.attack("/done", once(DONE))
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[RemoteAPI]:
    hook = start_receiver()
    yield hook
    hook.stop()


class WorkerUnderAttack:
    """The ``taskman worker`` process and what was measured of it."""

    def __init__(self, db: str, log: IO[bytes]) -> None:
        env = {**os.environ, **TEST_ENV, **WORKER_ENV, "DATABASE_URL": db}
        # Its log goes to a file: under attack it writes more than a pipe holds, and a
        # full pipe nobody reads would block the worker's logging, and so its shutdown.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=log)
        self.log = log
        self.baseline_mb: float | None = None

    def log_since(self, marker: bytes) -> str:
        """What the worker logged from the last line containing `marker` on."""
        self.log.seek(0)
        text = self.log.read()
        return text[text.rfind(marker):].decode(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture(scope="module")
def worker(db: str, sql: psycopg.Connection, healthy: HostileRemote) -> Iterator[WorkerUnderAttack]:
    with tempfile.TemporaryFile() as log:
        under_attack = WorkerUnderAttack(db, log)
        try:
            # Warm up (imports, pools, first polls), then take the memory baseline.
            ids = [create(sql, healthy.url("/done")) for _ in range(20)]
            wait_until(lambda: all(status(sql, t) == "completed" for t in ids), timeout=30)
            under_attack.baseline_mb = under_attack.rss_mb()
            yield under_attack
        finally:
            if under_attack.alive():
                under_attack.process.kill()
            under_attack.process.wait()


def create(conn: psycopg.Connection, url: str, **args: Any) -> str:
    args = {"poll_url": url, "poll_interval_seconds": 1, **args}
    named = ", ".join(f"{k} => %({k})s" for k in args)
    row = conn.execute(f"select taskman.create_task({named}) ->> 'task_id' as id", args).fetchone()
    return row["id"]


def status(conn: psycopg.Connection, task_id: str) -> str:
    return conn.execute("select status from taskman.tasks where task_id = %s",
                        (task_id,)).fetchone()["status"]


def polls(conn: psycopg.Connection, task_id: str) -> list[dict[str, Any]]:
    return conn.execute("select created_at, detail from taskman.task_events"
                        " where task_id = %s and event_type = 'polled' order by event_id",
                        (task_id,)).fetchall()


def check_controls_on_time(conn: psycopg.Connection, controls: list[str]) -> None:
    wait_until(lambda: all(status(conn, t) == "completed" for t in controls), timeout=10)
    took = conn.execute(
        "select max(extract(epoch from completed_at - created_at)) as s from taskman.tasks"
        " where task_id = any(%s::uuid[])", (controls,)).fetchone()["s"]
    assert took < ON_TIME, f"a healthy task took {took:.2f}s beside hostile ones"


def settle(conn: psycopg.Connection, task_ids: list[str]) -> None:
    """Wait until every task ended, or is still live after 3 polls (a remote that keeps
    saying "running", on schedule): those are cancelled here."""
    def settled() -> bool:
        rows = conn.execute("select status, (taskman.task_json(t) ->> 'attempt_count')::int"
                            " as attempt_count from taskman.tasks t"
                            " where task_id = any(%s::uuid[])", (task_ids,)).fetchall()
        return all(r["status"] in ("completed", "failed") or r["attempt_count"] >= 3
                   for r in rows)
    wait_until(settled, timeout=20)
    for task_id in task_ids:
        if status(conn, task_id) in ("pending", "in_progress"):
            conn.execute("select taskman.cancel_task(%s)", (task_id,))


def check_hostile_task(conn: psycopg.Connection, task_id: str,
                       hits: list[float] | None = None) -> dict[str, Any]:
    """The task ended (or kept running, on schedule, until cancelled); every poll is
    counted, every failed one is in the history with a reason (polls with no news leave
    none), and the remote saw polls (`hits`, one request each) at least FLOOR apart."""
    row = conn.execute("select status, error_code, error_message,"
                       " (taskman.task_json(t) ->> 'attempt_count')::int as attempt_count"
                       " from taskman.tasks t where task_id = %s", (task_id,)).fetchone()
    assert row["status"] in ("completed", "failed", "cancelled"), row
    if row["status"] == "cancelled":
        assert row["attempt_count"] >= 3
    if row["status"] == "failed":
        assert row["error_code"] and row["error_message"]
    seen = polls(conn, task_id)
    assert row["attempt_count"] >= 1 and len(seen) <= row["attempt_count"]
    for event in seen:
        if event["detail"]["outcome"] in ("error", "failed") and row["error_code"] != "timeout":
            assert event["detail"].get("reason"), event
    for before, after in itertools.pairwise(hits or []):
        assert after - before >= FLOOR * 0.95, hits
    return row


# Hostile answers ---------------------------------------------------------------------------

def _json(body: bytes, status_line: str = "200 OK", **headers: str) -> Attack:
    return once(response(status_line, body, {**JSON, **headers}))


def _deep(depth: int) -> Attack:
    return _json(b'{"status": "done", "result": ' + b"[" * depth + b"]" * depth + b"}")


def _wide(items: int) -> Attack:
    return _json(b'{"status": "done", "result": [' + b",".join([b"1"] * items) + b"]}")


def _never_ending(pause: float) -> Attack:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
    return Attack(lambda: _prefixed(head, forever(b"[" * 4096)), pause=pause)


def _prefixed(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _gzip_bomb(mib: int) -> Attack:
    bomb = gzip.compress(b'{"status": "done", "result": "' + b"0" * (mib << 20) + b'"}', 9)
    return _json(bomb, **{"Content-Encoding": "gzip"})


def _deflate_bomb(mib: int) -> Attack:
    return _json(zlib.compress(b" " * (mib << 20), 9), **{"Content-Encoding": "deflate"})


STATUS_LINES = ["0 Zero", "099 Low", "204 No Content", "299 Odd", "418 Teapot", "599 Odd",
                "600 Beyond", "999 Max", "1000 Four", "abc Text", "200", ""]
ODD_HEADERS = [
    ("202 Accepted", {"Retry-After": "0"}), ("202 Accepted", {"Retry-After": "-5"}),
    ("429 Too Many", {"Retry-After": "0"}), ("503 Busy", {"Retry-After": "1e309"}),
    ("503 Busy", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
    ("202 Accepted", {"Retry-After": "soon"}), ("301 Moved", {"Location": "http://[::1"}),
    ("302 Found", {"Location": "ftp://example.com/x"}), ("200 OK", {"Content-Length": "x"}),
    ("200 OK", {"Content-Type": "application/json; charset=no-such-charset"}),
]


@st.composite
def hostile_answers(draw: st.DrawFn) -> tuple[str, Attack | None]:
    kind = draw(st.sampled_from([
        "deep", "wide", "bad_utf8", "huge_number", "never_ending", "trickle", "gzip_bomb",
        "deflate_bomb", "corrupt_gzip", "brotli", "redirect_loop", "status_line",
        "odd_header", "short_body", "bad_header_bytes"]))
    if kind == "deep":
        return kind, _deep(draw(st.integers(200, 100_000)))
    if kind == "wide":
        return kind, _wide(draw(st.integers(10_000, 600_000)))
    if kind == "bad_utf8":
        junk = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _is_utf8(b)))
        return kind, _json(b'{"status": "done", "result": "' + junk + b'"}')
    if kind == "huge_number":
        digits = draw(st.integers(4_400, 50_000))
        return kind, _json(b'{"status": "done", "result": 1' + b"0" * digits + b"}")
    if kind == "never_ending":
        return kind, _never_ending(0.0)
    if kind == "trickle":
        return kind, Attack(lambda: _prefixed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", forever(b" ")), pause=0.2)
    if kind == "gzip_bomb":
        return kind, _gzip_bomb(draw(st.integers(2, 64)))
    if kind == "deflate_bomb":
        return kind, _deflate_bomb(draw(st.integers(2, 64)))
    if kind == "corrupt_gzip":
        return kind, _json(b"\x1f\x8b" + draw(st.binary(min_size=1, max_size=200)),
                           **{"Content-Encoding": "gzip"})
    if kind == "brotli":
        return kind, _json(b"\x0b\x02\x80{}\x03", **{"Content-Encoding": "br"})
    if kind == "redirect_loop":
        return kind, None  # the test points it at itself
    if kind == "status_line":
        return kind, once(response(draw(st.sampled_from(STATUS_LINES)),
                                   b'{"status": "done"}', JSON))
    if kind == "odd_header":
        line, headers = draw(st.sampled_from(ODD_HEADERS))
        return kind, once(response(line, b'{"status": "running"}', {**JSON, **headers}))
    if kind == "short_body":  # declares more than it sends, then closes
        return kind, once(response("200 OK", b'{"status"', {"Content-Length": "5000"},
                                   length=False))
    return kind, once(b"HTTP/1.1 200 OK\r\nX-Odd: \xff\xfe\x00bad\r\nNo colon here\r\n"
                      b"Content-Length: 18\r\n\r\n{\"status\": \"done\"}")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b'"' not in data and b"\\" not in data


@FEW
@given(answers=st.lists(hostile_answers(), min_size=1, max_size=6))
def test_hostile_answers_fail_or_retry_alone(sql, hostile, healthy, worker, answers) -> None:
    hostile_ids, paths = [], []
    for kind, answer in answers:
        path = f"/{kind}/{uuid.uuid4().hex}"
        loop = once(response("302 Found", headers={"Location": path}))
        hostile_ids.append(create(sql, hostile.attack(path, answer or loop), max_attempts=2))
        paths.append(path if answer else None)  # a redirect loop: several requests a poll
    controls = [create(sql, healthy.url("/done")) for _ in range(3)]
    check_controls_on_time(sql, controls)
    settle(sql, hostile_ids)
    for task_id, path in zip(hostile_ids, paths, strict=True):
        check_hostile_task(sql, task_id, hostile.hits(path) if path else None)
    assert worker.alive()


# Hostile expressions -----------------------------------------------------------------------

_LEAVES = st.sampled_from(["@", "items", "status", "items[0]", "`[1, 2]`", "'x'", "*"])


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    two = st.tuples(inner, inner)
    return st.one_of(
        two.map(lambda t: f"[{t[0]}, {t[1]}]"),
        two.map(lambda t: f"{t[0]} | {t[1]}"),
        two.map(lambda t: f"{{a: {t[0]}, b: {t[1]}}}"),
        two.map(lambda t: f"{t[0]} == {t[1]}"),
        two.map(lambda t: f"{t[0]} || {t[1]}"),
        inner.map(lambda e: f"({e})[]"),
        inner.map(lambda e: f"({e})[*]"),
        inner.map(lambda e: f"({e}).*"),
        inner.map(lambda e: f"items[?{e}]"),
        inner.map(lambda e: f"to_string({e})"),
        inner.map(lambda e: f"sort_by(items, &{e})"),
        inner.map(lambda e: f"length({e})"),
        inner.map(lambda e: f"join(',', {e})"),
    )


# Leaves include the known blow-ups: a list doubled at each step, a value shared so that
# written out it doubles at each step.
_BLOWUPS = st.integers(2, 40).flatmap(lambda n: st.sampled_from(
    ["[@, @][]" * n, "[@, @] | " * n + "@", f"[{', '.join(['items'] * n)}][]"]))
EXPRESSIONS = st.recursive(_LEAVES | _BLOWUPS, _extend, max_leaves=8)
BIG_ANSWER = json.dumps({"status": "done", "items": [{"id": i, "tags": ["a", "b"]}
                                                     for i in range(3000)]}).encode()


@settings(FEW, max_examples=10)
@given(expressions=st.lists(EXPRESSIONS, min_size=1, max_size=4))
def test_hostile_expressions_are_refused_or_bounded(sql, hostile, healthy, worker,
                                                    expressions) -> None:
    url = hostile.attack("/big", _json(BIG_ANSWER))
    accepted = []
    for expression in expressions:
        config = {"status_path": "status", "result_path": expression}
        problem = static_problem(expression)
        try:
            accepted.append(create(sql, url, max_attempts=2, poll_config=json.dumps(config)))
        except psycopg.errors.InvalidParameterValue as exc:
            assert problem is not None, expression  # the database and the worker agree
            assert f"poll_config .result_path {problem}" == exc.diag.message_primary
            continue
        assert problem is None, expression
    controls = [create(sql, healthy.url("/done")) for _ in range(3)]
    check_controls_on_time(sql, controls)
    settle(sql, accepted)
    for task_id in accepted:
        row = check_hostile_task(sql, task_id)
        if "evaluation budget" in (row["error_message"] or ""):
            assert (row["error_code"], row["attempt_count"]) == ("invalid_response", 1)
            assert polls(sql, task_id)[-1]["detail"]["reason"] == "evaluation_budget"
    assert worker.alive()


# Poison results in the outbox --------------------------------------------------------------

POISON = st.one_of(
    st.integers(1_500, 10_000).map(lambda d: "[" * d + "]" * d),  # deeper than Python reads
    st.integers(4_400, 20_000).map(lambda n: "1" + "0" * n),  # longer than Python's ints
    st.integers(0, 200_000).map(lambda n: json.dumps({"x": "y" * n})),  # fine, if large
)


@settings(FEW, max_examples=3)
@given(poisons=st.lists(POISON, min_size=1, max_size=4))
def test_poison_results_fail_alone_in_the_outbox(sql, receiver, worker, poisons) -> None:
    poisoned = {}
    for poison in poisons:
        task_id = create(sql, None, callback_url=f"{receiver.url()}/poison")
        complete_with_unbounded_result(sql, task_id, poison)
        poisoned[task_id] = poison
    control = create(sql, None, callback_url=f"{receiver.url()}/control/{uuid.uuid4().hex}")
    sql.execute("select taskman.update_task(%s, 'completed', '{\"ok\": true}')", (control,))
    ended = time.monotonic()
    wait_until(lambda: any(r.json()["task_id"] == control for r in receiver.delivered()
                           if r.path.startswith("/control/")), timeout=10)
    assert time.monotonic() - ended < ON_TIME

    def outcome(task_id: str) -> list[dict[str, Any]]:
        return sql.execute(
            "select event_type, detail from taskman.task_events where task_id = %s and"
            " event_type like 'notification%%' order by event_id", (task_id,)).fetchall()

    for task_id, poison in poisoned.items():
        wait_until(lambda t=task_id: any(e["event_type"] in ("notification_delivered",
                                                             "notification_given_up")
                                         for e in outcome(t)), timeout=15)
        events = outcome(task_id)
        if poison.startswith("{"):
            assert events[-1]["event_type"] == "notification_delivered"
        else:  # retried with backoff, then given up, its reason in its events
            assert [e["event_type"] for e in events] == ["notification_failed",
                                                         "notification_given_up"]
            assert {e["detail"]["reason"] for e in events} == {"unreadable_payload"}
    assert worker.alive()


# Last: memory, then SIGTERM in the middle of an attack ---------------------------------------

def test_memory_stayed_flat_and_sigterm_stops_the_worker_mid_attack(sql, hostile,
                                                                    worker) -> None:
    attacks = [_never_ending(0.05), _gzip_bomb(64), _deflate_bomb(64), _wide(400_000),
               Attack(lambda: _prefixed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                                        forever(b" ")), pause=0.3)]
    paths = [f"/last/{i}" for i in range(len(attacks))]
    for path, attack in zip(paths, attacks, strict=True):
        create(sql, hostile.attack(path, attack), max_attempts=50)
    costly = {"status_path": "status", "result_path": "[items, items][]"}
    create(sql, hostile.attack("/big", _json(BIG_ANSWER)), poll_config=json.dumps(costly))
    wait_until(lambda: all(len(hostile.hits(p)) >= 3 for p in paths), timeout=20)

    grown = worker.rss_mb() - worker.baseline_mb
    assert grown < 50, f"the worker grew by {grown:.0f} MB under attack"

    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=GRACE + 10) == 0
    took = time.monotonic() - signalled
    assert took < GRACE + 3, f"stopped in {took:.1f}s:\n{worker.log_since(b'stopping')}"
