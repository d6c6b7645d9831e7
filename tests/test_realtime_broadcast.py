"""Realtime by Broadcast: a Supabase project follows its tasks live on a private topic per
owner, and retention can then delete whole tasks (no Postgres Changes DELETE fan-out).

The database is made to look like a Supabase project's (tests/supabase_realtime.py)."""

from __future__ import annotations

import psycopg
import pytest

from tests.factories import USER_A, USER_B, create_task, task_row
from tests.supabase_realtime import emulate_supabase_realtime
from tests.test_cli import taskman
from tests.test_quiet_polls import _poll
from tests.test_retention import _finish


@pytest.fixture
def supabase(conn):
    emulate_supabase_realtime(conn)
    return conn


def _messages(conn) -> list[dict]:
    return conn.execute("select topic, event, payload, private from realtime.messages"
                        " order by inserted_at, id").fetchall()


def _published(conn) -> bool:
    return conn.execute("select count(*) as n from pg_publication_tables"
                        " where pubname = 'supabase_realtime' and schemaname = 'taskman'"
                        " and tablename = 'tasks'").fetchone()["n"] == 1


def _set_mode(conn, mode: str) -> str:
    return conn.execute("select taskman.set_realtime_mode(%s) as m", (mode,)).fetchone()["m"]


def test_each_visible_change_is_one_message_on_its_owners_topic(supabase, api) -> None:
    # Installed before Realtime was there: no mode until one is chosen.
    assert supabase.execute("select taskman.realtime_mode() as m").fetchone()["m"] == "none"
    assert _set_mode(supabase, "broadcast") == "broadcast"
    assert not _published(supabase)

    created = api.rpc("authenticated", "create_task", USER_A,
                      poll_url="https://api.example.com/jobs/1")
    task_id = created["task_id"]
    [inserted] = _messages(supabase)
    assert inserted["topic"] == f"taskman:tasks:{USER_A}" and inserted["private"]
    assert inserted["event"] == "INSERT" and inserted["payload"]["task_id"] == task_id
    assert "callback_token" not in inserted["payload"] and "poll_headers" not in inserted["payload"]

    _poll(supabase, task_id, status="in_progress", progress=10)
    for _ in range(5):
        _poll(supabase, task_id, status="in_progress", progress=10)  # no news
    _poll(supabase, task_id, status="completed", result={"ok": True})
    updates = _messages(supabase)[1:]
    assert [(m["event"], m["payload"]["status"], m["payload"]["progress"]) for m in updates] == [
        ("UPDATE", "in_progress", 10), ("UPDATE", "completed", 100)]


def test_rows_written_directly_through_postgrest_are_sent_too(supabase, api) -> None:
    _set_mode(supabase, "broadcast")
    with api.request("authenticated", USER_A) as cur:
        cur.execute("insert into taskman.tasks (poll_url) values ('https://api.example.com/x')")
    with api.request("authenticated", USER_A) as cur:
        cur.execute("""update taskman.tasks set metadata = '{"customer": 7}'""")
    sent = _messages(supabase)
    assert [(m["event"], m["topic"]) for m in sent] == [
        ("INSERT", f"taskman:tasks:{USER_A}"), ("UPDATE", f"taskman:tasks:{USER_A}")]
    assert sent[1]["payload"]["metadata"] == {"customer": 7}


def test_a_result_too_large_for_a_message_is_left_for_get_task_status(supabase) -> None:
    _set_mode(supabase, "broadcast")
    task_id = create_task(supabase)["task_id"]
    _poll(supabase, task_id, status="completed", result={"rows": ["x" * 1000] * 300})
    done = _messages(supabase)[-1]["payload"]
    assert done["status"] == "completed" and done["result_omitted"] is True
    assert "result" not in done
    assert len(task_row(supabase, task_id)["result"]["rows"]) == 300


def test_only_the_owner_may_receive_its_topic(supabase, api) -> None:
    _set_mode(supabase, "broadcast")
    api.rpc("authenticated", "create_task", USER_A, poll_url="https://api.example.com/jobs/1")
    topic = f"taskman:tasks:{USER_A}"
    # Realtime authorizes a private channel by reading realtime.messages as the user, with
    # the channel's topic in realtime.topic.
    seen = {}
    for who in (USER_A, USER_B):
        with api.request("authenticated", who) as cur:
            cur.execute("select set_config('realtime.topic', %s, true)", (topic,))
            seen[who] = cur.execute("select count(*) as n from realtime.messages"
                                    " where topic = realtime.topic()").fetchone()["n"]
    assert seen == {USER_A: 1, USER_B: 0}


def test_in_broadcast_mode_retention_deletes_whole_tasks_and_sends_nothing(
        supabase, database_url) -> None:
    _set_mode(supabase, "changes")
    kept = create_task(supabase)["task_id"]
    _finish(supabase, kept, "10 days")
    pruned = taskman(database_url, "prune", "--older-than", "7d")
    assert "task rows kept: Supabase Realtime streams taskman.tasks" in pruned.stdout
    assert task_row(supabase, kept) is not None

    _set_mode(supabase, "broadcast")
    old = create_task(supabase)["task_id"]
    _finish(supabase, old, "10 days")
    before = len(_messages(supabase))
    done = taskman(database_url, "prune", "--older-than", "7d")
    # Rows kept while Realtime streamed the table go too: the switch restarts the walk.
    assert done.stdout.startswith("pruned 2 finished tasks: 2 task rows")
    assert "task rows kept" not in done.stdout
    assert task_row(supabase, kept) is None and task_row(supabase, old) is None
    assert len(_messages(supabase)) == before


def test_back_to_postgres_changes(supabase, api) -> None:
    _set_mode(supabase, "broadcast")
    assert _set_mode(supabase, "broadcast") == "broadcast"  # the same mode again: no change
    assert _set_mode(supabase, "changes") == "changes"
    assert _published(supabase)
    api.rpc("authenticated", "create_task", USER_A, poll_url="https://api.example.com/jobs/1")
    assert _messages(supabase) == []
    assert supabase.execute("select count(*) as n from pg_policies where schemaname = 'realtime'"
                            ).fetchone()["n"] == 0


def test_a_failing_broadcast_never_fails_the_change(supabase, api) -> None:
    _set_mode(supabase, "broadcast")
    supabase.execute("alter table realtime.messages add constraint no_more check (false) not valid")
    created = api.rpc("authenticated", "create_task", USER_A,
                      poll_url="https://api.example.com/jobs/1")
    assert task_row(supabase, created["task_id"])["status"] == "pending"
    assert _messages(supabase) == []


def test_broadcast_needs_supabase_realtime_and_changes_nothing_without_it(conn) -> None:
    with pytest.raises(psycopg.Error) as err:
        _set_mode(conn, "broadcast")
    assert err.value.sqlstate == "22023"
    assert "needs Supabase Realtime (realtime.send)" in err.value.diag.message_primary
    assert not _published(conn)
    assert conn.execute("select taskman.realtime_mode() as m").fetchone()["m"] == "none"


def test_an_unknown_mode_is_refused(conn) -> None:
    with pytest.raises(psycopg.Error) as err:
        _set_mode(conn, "sometimes")
    assert (err.value.sqlstate, err.value.diag.message_primary) == (
        "22023", "mode must be changes or broadcast")


@pytest.mark.parametrize("role,sub", [("anon", None), ("authenticated", USER_A)])
def test_api_users_cannot_switch_the_mode(supabase, api, role, sub) -> None:
    with pytest.raises(psycopg.Error) as err, api.request(role, sub) as cur:
        cur.execute("select taskman.set_realtime_mode('broadcast')")
    assert err.value.sqlstate == "42501"
    assert supabase.execute("select taskman.realtime_mode() as m").fetchone()["m"] == "none"


def test_the_cli_switches_and_reports_the_mode(supabase, database_url) -> None:
    assert taskman(database_url, "realtime").stdout.startswith("realtime: none")
    switched = taskman(database_url, "realtime", "broadcast")
    assert switched.returncode == 0, switched.stderr
    assert switched.stdout.startswith("realtime: broadcast")
    assert not _published(supabase)
    changes = taskman(database_url, "realtime", "changes")
    assert changes.stdout.startswith("realtime: changes")
    assert _published(supabase)
    # The cost is said where the choice is made.
    assert "retention keeps every finished task row" in changes.stdout
    assert "Supabase recommends Broadcast" in changes.stdout
    helped = " ".join(taskman(database_url, "realtime", "--help").stdout.split())
    assert "retention keeps every finished task row" in helped


def test_the_cli_explains_a_refusal(conn, database_url) -> None:
    refused = taskman(database_url, "realtime", "broadcast")
    assert refused.returncode == 2
    assert "needs Supabase Realtime" in refused.stderr
