"""Security, second pass, tried the PostgREST way: a token without a user id, host names
no resolver takes, and oversized poll_config."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.factories import create_task, task_row

NO_SUB = ("authenticated", None)  # a signed JWT whose claims carry no sub


def _sqlstate(api, statement: str, params: tuple = ()) -> str | None:
    try:
        with api.request(*NO_SUB) as cur:
            cur.execute(statement, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


@pytest.fixture
def service_task(conn) -> dict:
    return create_task(conn, idempotency_key="nightly-export", metadata={"customer": 7})


@pytest.mark.parametrize("call", [
    "select taskman.create_task(poll_url => 'https://api.example.com/x')",
    "select taskman.create_task(idempotency_key => 'nightly-export')",
    "select taskman.get_task_status(%(task)s)",
    "select taskman.cancel_task(%(task)s)",
    "select taskman.retry_task(%(task)s)",
    "select taskman.task_stats()",
])
def test_every_rpc_refuses_a_signed_in_caller_without_a_user_id(api, conn, service_task,
                                                                 call) -> None:
    before = task_row(conn, service_task["task_id"])
    state = _sqlstate(api, call.replace("%(task)s", "%s"),
                      (service_task["task_id"],) if "%(task)s" in call else ())
    assert state == "42501"
    assert task_row(conn, service_task["task_id"]) == before


@pytest.mark.parametrize("write", [
    "insert into taskman.tasks (poll_url) values ('https://api.example.com/x')",
    "update taskman.tasks set metadata = '{\"x\": 1}'",
    "delete from taskman.tasks",
])
def test_every_table_write_refuses_it(api, conn, service_task, write) -> None:
    assert _sqlstate(api, write) == "42501"
    assert task_row(conn, service_task["task_id"])["metadata"] == {"customer": 7}


def test_it_reads_nothing_of_the_services_tasks(api, service_task) -> None:
    with api.request(*NO_SUB) as cur:
        assert cur.execute("select * from taskman.tasks").fetchall() == []
        assert cur.execute("select * from taskman.task_events").fetchall() == []


def test_a_token_holder_without_an_account_still_reports(api, conn) -> None:
    task = create_task(conn, poll_url=None)
    answer = api.rpc("anon", "update_task", task_id=task["task_id"], progress=40,
                     callback_token=task["callback_token"])
    assert answer == {"task_id": task["task_id"], "status": "pending"}
    assert task_row(conn, task["task_id"])["progress"] == 40


@pytest.mark.parametrize("url", [
    "https://a..example.com/status",
    "https://.example.com/status",
    "https://" + "a" * 64 + ".example.com/status",
    "https://" + ".".join(["abcdefghi"] * 26) + ".com/status",  # 264 characters
    "https://api.example.com:99999/status",
])
def test_host_names_no_resolver_takes_are_refused_at_creation(api, conn, url) -> None:
    for column in ("poll_url", "callback_url"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            create_task(conn, **{column: url})
        assert refused.value.diag.column_name == column
    with pytest.raises(psycopg.errors.InvalidParameterValue), \
            api.request("authenticated", "aaaaaaaa-0000-4000-8000-000000000001") as cur:
        cur.execute("insert into taskman.tasks (poll_url) values (%s)", (url,))


@pytest.mark.parametrize("url", [
    "https://api.example.com./status",
    "https://[2001:db8::1]:8443/status",
    "http://status_host.internal/jobs/1",
    "https://bücher.example/jobs/1",
    "https://" + "a" * 63 + ".example.com:65535/status",
])
def test_host_names_resolvers_take_are_accepted(conn, url) -> None:
    assert create_task(conn, poll_url=url)["poll_url"] == url


def test_poll_config_has_a_byte_limit(conn) -> None:
    values = [f"state-{i:05d}" for i in range(2_000)]  # about 26 KiB of JSON
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        create_task(conn, poll_config={"completed_values": values})
    assert refused.value.diag.column_name == "poll_config"
    assert "16 KiB" in refused.value.diag.message_primary
    small = create_task(conn, poll_config={"completed_values": values[:100]})
    assert len(json.dumps(small["poll_config"])) < 16_384
