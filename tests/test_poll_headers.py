"""Poll headers are checked where they enter: the database refuses what HTTP cannot carry
(RFC 9110), the worker sends what it accepted byte for byte, and a stored header that
still cannot be sent fails its task with poll_error instead of leaving it pending."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import create_task, events
from tests.remote_api import RemoteAPI, Reply, remote_api
from tests.test_poller import poll
from tests.worker_harness import running_worker, wait_until
from worker.remote.headers import headers_problem

TOKEN_CHARS = "abcXYZ09!#$%&'*+.^_`|~-"
NAMES = st.one_of(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12),
                  st.text(max_size=12))
VALUES = st.one_of(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e)
                           | st.just("\t"), max_size=30),
                   st.text(max_size=30))


@pytest.fixture(scope="module")
def echo() -> Iterator[RemoteAPI]:
    with remote_api() as api:
        yield api


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=NAMES, value=VALUES)
def test_headers_are_accepted_exactly_when_http_can_carry_them(module_conn, echo, name,
                                                               value) -> None:
    headers = {name: value}
    try:
        with module_conn.transaction(force_rollback=True):
            module_conn.execute("insert into taskman.tasks (poll_url, poll_headers)"
                             " values ('https://api.example.com/1', %s)", (json.dumps(headers),))
        accepted = True
    except psycopg.Error as exc:
        # 22P05: jsonb itself refuses NUL characters
        assert exc.sqlstate in ("22023", "22P05"), exc
        assert exc.sqlstate == "22P05" or "poll_headers" in exc.diag.message_primary
        accepted = False
    assert accepted == (headers_problem(headers) is None)
    if accepted:
        url = echo.script("/echo", Reply(json={"status": "done"}))
        assert poll(url, headers=headers)["status"] == "completed"
        sent = {k.lower(): v for k, v in echo.hits("/echo")[-1].headers.items()}
        assert sent[name.lower()] == value


@pytest.mark.parametrize(("headers", "problem"), [
    ({"X-Key": "caf\u00e9"}, "'X-Key' has a value that is not valid in HTTP"),
    ({"X-Key": "a\r\nX-Injected: 1"}, "'X-Key' has a value that is not valid in HTTP"),
    ({"Content-Length": "3"}, "'Content-Length' is set by Taskman's HTTP client"),
])
def test_a_stored_header_that_cannot_be_sent_fails_the_task_with_poll_error(
        conn, database_url, headers, problem) -> None:
    with remote_api() as remote:
        url = remote.script("/jobs/h", Reply(json={"status": "done"}))
        task_id = create_task(conn, poll_url=url)["task_id"]
        # As stored before headers were checked at creation.
        conn.execute("update taskman_private.task_private set poll_headers = %s"
                     " where task_id = %s", (json.dumps(headers), task_id))
        with running_worker(database_url):
            row = wait_until(lambda: conn.execute(
                "select * from taskman.tasks where task_id = %s and status = 'failed'",
                (task_id,)).fetchone())
        assert remote.hits("/jobs/h") == []
    assert (row["error_code"], row["attempt_count"]) == ("poll_error", 1)
    assert "could not be sent" in row["error_message"] and problem in row["error_message"]
    polled = [e for e in events(conn, task_id) if e["event_type"] == "polled"]
    assert polled[0]["detail"]["reason"] == "invalid_request"
