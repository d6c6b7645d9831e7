"""Bad input is refused with SQLSTATE 22023, a message naming the field, and no change."""

from __future__ import annotations

import json

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import USER_A

BAD_INPUT = [
    ("poll_url", "ftp://files.example.com/x"),
    ("poll_url", "javascript:alert(1)"),
    ("poll_url", "https://" + "a" * 2100),
    ("callback_url", "file:///etc/passwd"),
    ("poll_method", "DELETE"),
    ("poll_method", "TRACE"),
    ("timeout_minutes", -5),
    ("timeout_minutes", 0),
    ("timeout_minutes", 10_000_000),
    ("max_attempts", 0),
    ("max_attempts", 100_000),
    ("poll_interval_seconds", -1),
    ("task_type", "has spaces"),
    ("task_type", ""),
    ("poll_config", json.dumps([1, 2])),
    ("poll_config", json.dumps({"profile": "no-such-profile"})),
    ("poll_config", json.dumps({"status_path": 42})),
    ("poll_config", json.dumps({"completed_values": "done"})),
    ("poll_config", json.dumps({"surprise": True})),
    ("metadata", json.dumps({"blob": "x" * 70_000})),
    ("metadata", json.dumps(["not", "an", "object"])),
    ("poll_config", json.dumps({"status_path": "[@,@][]" * 6})),  # 6 projections
    ("poll_config", json.dumps({"result_path": "(" * 11 + "a" + ")" * 11})),
    ("poll_config", json.dumps({"error_path": "||".join(["length(a)"] * 9)})),
    ("poll_config", json.dumps({"progress_path": "a" * 501})),
    ("poll_config", json.dumps({"completed_values": ["done"] * 3000})),  # over 16 KiB
    ("poll_headers", json.dumps({"X-Key": 123})),
    ("poll_headers", json.dumps({"Bad Header": "v"})),
    ("poll_headers", json.dumps({"X-Key": "caf\u00e9"})),  # not ASCII
    ("poll_headers", json.dumps({"X-Key": "a\r\nX-Injected: 1"})),
    ("poll_headers", json.dumps({"X-Key": " padded "})),
    ("poll_headers", json.dumps({"X-Key": "bell\u0007"})),  # (jsonb itself refuses NUL)
    ("poll_headers", json.dumps({"Content-Length": "5"})),
    ("poll_headers", json.dumps({"Transfer-Encoding": "chunked"})),
    ("idempotency_key", "k" * 300),
]


def _count(conn) -> int:
    return conn.execute("select (select count(*) from taskman.tasks)"
                        " + (select count(*) from taskman_private.task_private) as n"
                        ).fetchone()["n"]


@pytest.mark.parametrize(("field", "value"), BAD_INPUT)
def test_create_task_refuses_bad_input_naming_the_field(api, conn, field, value) -> None:
    with pytest.raises(psycopg.Error) as err:
        api.rpc("authenticated", "create_task", USER_A, **{field: value})
    assert err.value.sqlstate == "22023"
    assert field in err.value.diag.message_primary
    assert _count(conn) == 0


@pytest.mark.parametrize(("field", "value"), BAD_INPUT)
def test_plain_insert_refuses_the_same_bad_input(api, conn, field, value) -> None:
    with pytest.raises(psycopg.Error) as err, api.request("authenticated", USER_A) as cur:
        cur.execute(f"insert into taskman.tasks ({field}) values (%s)", (value,))
    assert err.value.sqlstate == "22023"
    assert field in err.value.diag.message_primary
    assert _count(conn) == 0


@pytest.mark.parametrize(("column", "value"), [
    ("status", "completed"), ("result", "{}"), ("attempt_count", 5), ("error_count", 1),
    ("progress", 50), ("next_poll_at", "2030-01-01"), ("deadline_at", "2030-01-01"),
])
def test_plain_insert_cannot_set_fields_taskman_manages(api, conn, column, value) -> None:
    with pytest.raises(psycopg.Error) as err, api.request("authenticated", USER_A) as cur:
        cur.execute(f"insert into taskman.tasks ({column}) values (%s)", (value,))
    assert err.value.sqlstate == "22023"
    assert _count(conn) == 0


@pytest.mark.parametrize(("args", "field"), [
    ({"status": "done"}, "status"),
    ({"status": "pending"}, "status"),
    ({"progress": 101}, "progress"),
    ({"progress": -1}, "progress"),
])
def test_update_task_refuses_bad_values_and_changes_nothing(conn, args, field) -> None:
    task = conn.execute("select taskman.create_task('https://api.example.com/1') as r"
                        ).fetchone()["r"]
    before = conn.execute("select * from taskman.tasks").fetchone()
    named = ", ".join(f"{k} => %({k})s" for k in args)
    with pytest.raises(psycopg.Error) as err:
        conn.execute(f"select taskman.update_task(%(task_id)s, {named})",
                     {"task_id": task["task_id"], **args})
    assert err.value.sqlstate == "22023" and field in err.value.diag.message_primary
    assert conn.execute("select * from taskman.tasks").fetchone() == before


@pytest.mark.parametrize(("call", "field"), [
    ("select * from taskman.claim_due_tasks('w', 0, 60)", "batch_size"),
    ("select * from taskman.claim_due_tasks('w', 10, -1)", "lease_seconds"),
    ("select * from taskman.claim_due_tasks('', 10, 60)", "worker_id"),
    ("select * from taskman.record_poll_results('{}')", "results"),
    ("select * from taskman.record_poll_results('[{\"task_id\": null}]')", "results"),
])
def test_worker_functions_refuse_bad_arguments(conn, call, field) -> None:
    with pytest.raises(psycopg.Error) as err:
        conn.execute(call)
    assert err.value.sqlstate == "22023" and field in err.value.diag.message_primary


@pytest.mark.parametrize(("column", "expression", "problem"), [
    ("status_path", "a[*].b[*].c[*].d[*].e[*].f[*]", "has 6 projections"),
    ("result_path", "[" * 11 + "@" + "]" * 11, "nests brackets 11 deep"),
    ("error_path", "x" * 501, "is longer than 500 characters"),
])
def test_response_profiles_refuse_expressions_past_the_bounds(conn, column, expression,
                                                              problem) -> None:
    with pytest.raises(psycopg.Error) as err:
        conn.execute(f"insert into taskman.response_profiles (name, status_path, {column})"
                     " values ('mine', 'status', %s)"
                     if column != "status_path" else
                     "insert into taskman.response_profiles (name, status_path)"
                     " values ('mine', %s)",
                     (expression,))
    assert err.value.sqlstate == "22023"
    assert err.value.diag.message_primary.startswith(f"{column} {problem}")
    with pytest.raises(psycopg.Error):
        conn.execute(f"update taskman.response_profiles set {column} = %s where name = 'generic'",
                     (expression,))
    assert conn.execute("select count(*) as n from taskman.response_profiles"
                        " where name = 'mine'").fetchone()["n"] == 0


def test_expressions_within_the_bounds_and_valid_headers_are_accepted(conn) -> None:
    conn.execute("insert into taskman.response_profiles (name, status_path, result_path)"
                 " values ('mine', 'job.\"state[*]\"', 'files[?size > `1`].urls[*] | [0]')")
    headers = {"Authorization": "Bearer abc.def", "X-Empty": "", "X-Inner": "a b\tc",
               "X-All": "".join(chr(c) for c in range(0x21, 0x7F))}
    task = conn.execute("select taskman.create_task(poll_url => 'https://api.example.com/1',"
                        " poll_headers => %s, poll_config => %s) as t",
                        (json.dumps(headers), json.dumps({"profile": "mine"}))).fetchone()["t"]
    stored = conn.execute("select poll_headers from taskman_private.task_private"
                          " where task_id = %s", (task["task_id"],)).fetchone()
    assert stored["poll_headers"] == headers


# is_http_url as first written (one pattern, the host's labels walked); the function
# now takes a shorter road for plain URLs and must give the same answer for any URL.
REFERENCE_URL_CHECK = r"""
select %(u)s ~* '^https?://[^\s/?#@]+(:[0-9]{1,5})?([/?#][^\s]*)?$'
   and length(%(u)s) <= 2048
   and (select case when h ~ '^\[[0-9A-Fa-f:.]+\]$' then true
               else length(h) <= 254 and not exists (
                 select 1 from unnest(string_to_array(
                   case when h ~ '[^.]\.$' then left(h, -1) else h end, '.')) as label
                 where length(label) not between 1 and 63) end
        from (select substring(%(u)s from '^[A-Za-z]+://(\[[^]]*\]|[^/?#:]+)') as h) x)
   and coalesce(substring(%(u)s from '^[A-Za-z]+://(?:\[[^]]*\]|[^/?#:]+):([0-9]+)')::integer,
                0) <= 65535 as ok
"""
URLS = st.tuples(
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "https:/"]),
    st.sampled_from(["", "u@"]),
    st.one_of(st.sampled_from(["api.example.com", "a", "[::1]", "a-b.c.", "a..b", ".a", "a.",
                               ".", "", "x_y", "1.2.3.4", "a" * 63 + ".b", "a" * 64 + ".b",
                               "ab." * 85, "a." * 127]),
              st.text(alphabet="ab9.-_[]:", max_size=70)),
    st.sampled_from(["", ":", ":80", ":0080", ":65535", ":65536", ":123456", ":x"]),
    st.sampled_from(["", "/", "/x?y#z", "?q", "#f", "/a b", "/@x", "x", "/" + "p" * 2040]))


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(pieces=URLS)
def test_url_check_gives_the_reference_answer_for_any_url(module_conn, pieces) -> None:
    url = "".join(pieces)
    expected = module_conn.execute(REFERENCE_URL_CHECK, {"u": url}).fetchone()["ok"]
    got = module_conn.execute("select taskman_private.is_http_url(%s) as ok", (url,)).fetchone()
    assert got["ok"] == expected
