"""Row-level security, grants and secrets, tried the way an attacker would."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from tests.factories import USER_A, USER_B, task_row

SECRET_HEADER = "Bearer sk-live-SECRET-HEADER-123"
RAW_BODY = "RAW-REMOTE-BODY-stacktrace-at-internal-host-10.1.2.3"
DENIED = "denied"


@pytest.fixture
def world(api, conn):
    """Two users with a task each; A's task has a secret header and a raw remote body."""
    a = api.rpc("authenticated", "create_task", USER_A,
                poll_url="https://api.example.com/a", poll_headers=json.dumps(
                    {"Authorization": SECRET_HEADER}), callback_url="https://hooks.example.com/a")
    b = api.rpc("authenticated", "create_task", USER_B, poll_url="https://api.example.com/b")
    claimed = conn.execute("select task_id from taskman.claim_due_tasks('w1', 10, 60)").fetchall()
    assert len(claimed) == 2
    outcome = {"task_id": a["task_id"], "worker_id": "w1", "ok": True, "status": "failed",
               "error_code": "remote_failed", "raw_response": RAW_BODY, "raw_error": RAW_BODY,
               "http_status": 200}
    conn.execute("select * from taskman.record_poll_results(%s)", (json.dumps([outcome]),))
    return {"a": a["task_id"], "b": b["task_id"]}


def _attempt(api, role, sub, statement, params=()):
    """Run one statement as a PostgREST request; rows affected/returned, or DENIED."""
    try:
        with api.request(role, sub) as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else cur.rowcount
    except psycopg.errors.InsufficientPrivilege:
        return DENIED


ROLES = {"anon": ("anon", None), "user_a": ("authenticated", USER_A),
         "user_b": ("authenticated", USER_B), "service": ("service_role", None)}


@pytest.mark.parametrize("who", ROLES)
def test_rls_matrix_on_tasks(api, world, who) -> None:
    role, sub = ROLES[who]
    mine = {"user_a": world["a"], "user_b": world["b"]}.get(who)
    theirs = {"user_a": world["b"], "user_b": world["a"]}.get(who)

    seen = _attempt(api, role, sub, "select task_id from taskman.tasks")
    inserted = _attempt(api, role, sub, "insert into taskman.tasks (poll_url) values "
                        "('https://api.example.com/new') returning user_id")
    status_update = _attempt(api, role, sub, "update taskman.tasks set status = 'completed' "
                             "where status = 'pending'")
    deleted = _attempt(api, role, sub, "delete from taskman.tasks")

    if who == "anon":
        assert (seen, inserted, status_update, deleted) == (DENIED,) * 4
    elif who == "service":
        assert {str(r["task_id"]) for r in seen} == {world["a"], world["b"]}
        assert inserted == [{"user_id": None}]
        assert status_update == 2  # B's task and the new one; A's failed task is final
        assert deleted == 3
    else:
        assert [str(r["task_id"]) for r in seen] == [mine]
        assert [str(r["user_id"]) for r in inserted] == [sub]
        assert status_update == DENIED and deleted == DENIED
        # Metadata is the one column owners edit, and only on their own rows.
        assert _attempt(api, role, sub, "update taskman.tasks set metadata = '{\"x\": 1}' "
                        "where task_id = %s", (mine,)) == 1
        assert _attempt(api, role, sub, "update taskman.tasks set metadata = '{\"x\": 1}' "
                        "where task_id = %s", (theirs,)) == 0
        other = USER_B if who == "user_a" else USER_A
        assert _attempt(api, role, sub, "insert into taskman.tasks (user_id) values (%s)",
                        (other,)) == DENIED
        for column, value in [("result", "'{}'"), ("attempt_count", "0"), ("error_count", "0"),
                              ("user_id", f"'{other}'"), ("progress", "50")]:
            assert _attempt(api, role, sub, f"update taskman.tasks set {column} = {value} "
                            "where task_id = %s", (mine,)) == DENIED, column


@pytest.mark.parametrize("who", ROLES)
def test_rls_matrix_on_events_and_profiles(api, world, who) -> None:
    role, sub = ROLES[who]
    events = _attempt(api, role, sub, "select distinct task_id from taskman.task_events")
    event_insert = _attempt(api, role, sub, "insert into taskman.task_events (task_id, event_type)"
                            " values (%s, 'created')", (world["a"],))
    event_delete = _attempt(api, role, sub, "delete from taskman.task_events")
    profiles = _attempt(api, role, sub, "select name from taskman.response_profiles")
    profile_insert = _attempt(api, role, sub, "insert into taskman.response_profiles (name, "
                              "status_path) values ('mine', 'status')")
    if who == "anon":
        assert {events, event_insert, event_delete, profiles, profile_insert} == {DENIED}
    elif who == "service":
        assert {str(r["task_id"]) for r in events} == {world["a"], world["b"]}
        assert event_insert == 1 and profile_insert == 1
    else:
        mine = world["a"] if who == "user_a" else world["b"]
        assert [str(r["task_id"]) for r in events] == [mine]
        assert {event_insert, event_delete, profile_insert} == {DENIED}
        assert {r["name"] for r in profiles} >= {"generic", "celery", "standard", "http"}


@pytest.mark.parametrize("who", ["anon", "user_a", "user_b"])
@pytest.mark.parametrize("table", ["taskman_private.task_private", "taskman_private.outbox"])
def test_private_tables_are_unreachable_for_api_users(api, world, who, table) -> None:
    role, sub = ROLES[who]
    for statement in (f"select * from {table}", f"delete from {table}",
                      f"update {table} set task_id = task_id"):
        assert _attempt(api, role, sub, statement) == DENIED


def test_service_role_reads_private_task_data(api, world) -> None:
    rows = _attempt(api, "service_role", None,
                    "select poll_headers, last_response from taskman_private.task_private "
                    "where task_id = %s", (world["a"],))
    assert rows == [{"poll_headers": {"Authorization": SECRET_HEADER}, "last_response": RAW_BODY}]


WORKER_FUNCTIONS = {"claim_due_tasks", "record_poll_results", "expire_overdue_tasks",
                    "release_tasks", "claim_outbox", "record_outbox_results", "release_outbox",
                    "prune_finished_tasks", "record_remote_cancellations", "admit_tasks",
                    "record_host_outcomes", "reset_host", "set_host_limits",
                    "hold_callbacks", "realtime_mode", "set_realtime_mode",
                    "claim_admitted_tasks", "record_polls", "prune_idle_hosts",
                    "give_up_stale_notifications", "claim_deliveries"}
USER_FUNCTIONS = {"create_task", "get_task_status", "cancel_task", "retry_task", "task_stats",
                  "task_json", "host_status", "rotate_callback_secret"}


def test_every_public_function_has_exactly_the_intended_grants(conn) -> None:
    rows = conn.execute(
        "select p.proname, has_function_privilege('anon', p.oid, 'execute') as anon,"
        " has_function_privilege('authenticated', p.oid, 'execute') as authenticated,"
        " has_function_privilege('service_role', p.oid, 'execute') as service"
        " from pg_proc p where p.pronamespace = 'taskman'::regnamespace").fetchall()
    grants = {r["proname"]: (r["anon"], r["authenticated"], r["service"]) for r in rows}
    expected = {name: (False, False, True) for name in WORKER_FUNCTIONS}
    expected |= {name: (False, True, True) for name in USER_FUNCTIONS}
    # Callback-token holders (checked inside before anything is read or changed).
    expected["update_task"] = expected["callback_profile"] = (True, True, True)
    assert grants == expected


@pytest.mark.parametrize("role,sub", [("anon", None), ("authenticated", USER_A)])
@pytest.mark.parametrize("call", [
    "select * from taskman.claim_due_tasks('evil', 10, 60)",
    "select * from taskman.record_poll_results('[]')",
    "select taskman.expire_overdue_tasks()",
    "select taskman.release_tasks('w1')",
    "select * from taskman.prune_finished_tasks(interval '0', 10, false)",
    "select * from taskman.prune_idle_hosts(interval '0', 10, false)",
    "select * from taskman.give_up_stale_notifications(interval '0', 10)",
    "select * from taskman.claim_deliveries('evil', 10, 60)",
    "select * from taskman.admit_tasks('w1', '[]')",
    "select * from taskman.claim_admitted_tasks('evil', 10, 60)",
    "select taskman.record_polls('w1', '[]')",
    "select * from taskman.record_host_outcomes('w1', '[]')",
    "select * from taskman.hold_callbacks('w1', '[]')",
    "select taskman.reset_host('https://api.example.com:443')",
    """select taskman.set_host_limits('{"https://api.example.com:443": 1}')""",
    "select taskman.set_realtime_mode('broadcast')",
])
def test_api_users_cannot_run_worker_functions(api, world, role, sub, call) -> None:
    assert _attempt(api, role, sub, call) == DENIED


def test_security_definer_functions_pin_search_path(conn) -> None:
    unpinned = conn.execute(
        "select p.oid::regprocedure::text as fn from pg_proc p"
        " where p.prosecdef and p.pronamespace in ('taskman'::regnamespace,"
        " 'taskman_private'::regnamespace)"
        " and not exists (select 1 from unnest(p.proconfig) c where c like 'search_path=%%')"
    ).fetchall()
    assert unpinned == []


def test_secrets_and_raw_bodies_are_unreadable_by_every_user_path(api, world) -> None:
    """Everything user A can reach about its own task, dumped: no header, no raw body."""
    a = world["a"]
    reachable = [
        _attempt(api, "authenticated", USER_A, "select * from taskman.tasks"),
        _attempt(api, "authenticated", USER_A, "select * from taskman.task_events"),
        api.rpc("authenticated", "get_task_status", USER_A, task_id=a),
        api.rpc("authenticated", "retry_task", USER_A, task_id=a),
        api.rpc("authenticated", "cancel_task", USER_A, task_id=a),
        api.rpc("authenticated", "task_stats", USER_A),
        api.rpc("authenticated", "create_task", USER_A, poll_headers=json.dumps(
            {"Authorization": SECRET_HEADER})),
    ]
    dumped = json.dumps(reachable, default=str)
    assert SECRET_HEADER not in dumped and "sk-live" not in dumped
    assert RAW_BODY not in dumped
    assert "The remote job reported that it failed." in dumped  # the neutral sentence is there


def test_tasks_column_never_stores_poll_headers(conn, world) -> None:
    assert task_row(conn, world["a"])["poll_headers"] is None


def test_user_cannot_act_on_another_users_task_and_learns_nothing(api, world) -> None:
    for function in ("get_task_status", "cancel_task", "retry_task"):
        with pytest.raises(psycopg.Error) as theirs:
            api.rpc("authenticated", function, USER_B, task_id=world["a"])
        with pytest.raises(psycopg.Error) as missing:
            api.rpc("authenticated", function, USER_B, task_id=str(uuid.uuid4()))
        assert theirs.value.sqlstate == missing.value.sqlstate == "PT404"


def test_task_stats_counts_only_the_callers_tasks(api, world) -> None:
    a = api.rpc("authenticated", "task_stats", USER_A)
    service = api.rpc("service_role", "task_stats")
    assert a["total"] == 1 and a["by_status"]["failed"] == 1 and a["success_rate"] == 0
    assert service["total"] == 2


class TestCallbackToken:
    def test_anon_with_the_right_token_completes_the_task(self, api, conn) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        done = api.rpc("anon", "update_task", task_id=task["task_id"], status="completed",
                       result=json.dumps({"url": "https://files.example.com/r.csv"}),
                       callback_token=task["callback_token"])
        assert done["status"] == "completed"
        assert task_row(conn, task["task_id"])["result"] == {"url": "https://files.example.com/r.csv"}

    @pytest.mark.parametrize("token", [None, "", "0" * 64, "wrong"])
    def test_a_wrong_or_missing_token_changes_nothing(self, api, conn, token) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        before = task_row(conn, task["task_id"])
        with pytest.raises(psycopg.Error) as err:
            api.rpc("anon", "update_task", task_id=task["task_id"], status="completed",
                    callback_token=token)
        assert err.value.sqlstate == "PT403"
        assert task_row(conn, task["task_id"]) == before

    def test_a_token_only_opens_its_own_task(self, api, conn) -> None:
        one = api.rpc("authenticated", "create_task", USER_A)
        two = api.rpc("authenticated", "create_task", USER_A)
        with pytest.raises(psycopg.Error) as err:
            api.rpc("anon", "update_task", task_id=two["task_id"], status="failed",
                    callback_token=one["callback_token"])
        assert err.value.sqlstate == "PT403"
        assert task_row(conn, two["task_id"])["status"] == "pending"

    def test_the_token_is_stored_only_as_a_hash(self, api, conn) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        dump = conn.execute("select t::text || p::text as everything from taskman.tasks t"
                            " join taskman_private.task_private p using (task_id)").fetchone()
        assert task["callback_token"] not in dump["everything"]

    def test_a_repeated_final_callback_is_accepted_once_and_then_a_no_op(self, api, conn) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        args = {"task_id": task["task_id"], "status": "completed",
                "callback_token": task["callback_token"]}
        api.rpc("anon", "update_task", **args)
        api.rpc("anon", "update_task", **args)
        transitions = conn.execute("select count(*) as n from taskman.task_events"
                                   " where task_id = %s and to_status = 'completed'"
                                   " and event_type = 'status_changed'",
                                   (task["task_id"],)).fetchone()["n"]
        assert transitions == 1


def test_a_third_partys_failure_text_stays_service_side(api, conn) -> None:
    task = api.rpc("authenticated", "create_task", USER_A)
    api.rpc("anon", "update_task", task_id=task["task_id"], status="failed",
            error_message=RAW_BODY, callback_token=task["callback_token"])
    seen = api.rpc("authenticated", "get_task_status", USER_A, task_id=task["task_id"])
    assert seen["error_message"] == "The remote job reported that it failed."
    kept = conn.execute("select last_error from taskman_private.task_private where task_id = %s",
                        (task["task_id"],)).fetchone()
    assert kept["last_error"] == RAW_BODY
