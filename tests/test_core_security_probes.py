"""The database API probed as PostgREST calls it: ownerless tasks, planted poll headers,
callback tokens, history growth, sequence rights and role claims (issue 16)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from tests.factories import USER_A, USER_B, create_task, events, set_status, task_row
from worker import db

SECRET = {"Authorization": "Bearer A-SECRET"}
PLANTED = {"Authorization": "Bearer B-PLANTED", "Host": "evil.example.com"}
TASK_RPCS = ("get_task_status", "cancel_task", "retry_task")


def _sqlstate(call) -> str | None:
    try:
        call()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def _private(conn) -> list[dict]:
    return conn.execute("select * from taskman_private.task_private order by task_id").fetchall()


def _claimed_headers(conn) -> dict[str, dict]:
    rows = conn.execute("select task_id, poll_headers from taskman.claim_due_tasks('w1', 100, 60)")
    return {str(r["task_id"]): r["poll_headers"] for r in rows}


def _plain_insert(api, sub: str, **columns) -> str:
    names = ", ".join(columns)
    values = ", ".join(f"%({k})s" for k in columns)
    with api.request("authenticated", sub) as cur:
        cur.execute(f"insert into taskman.tasks ({names}) values ({values}) returning task_id",
                    {k: json.dumps(v) if isinstance(v, dict) else v for k, v in columns.items()})
        return str(cur.fetchone()["task_id"])


class TestOwnerlessTasks:
    """Tasks made by the service (API key, CLI, n8n with the service key) have no owner."""

    @pytest.fixture
    def ownerless(self, conn) -> str:
        task_id = create_task(conn)["task_id"]
        set_status(conn, task_id, "cancelled")  # so that retry_task would otherwise succeed
        return task_id

    @pytest.mark.parametrize("function", TASK_RPCS)
    @pytest.mark.parametrize("sub", [USER_B, None], ids=["signed-in", "no-user-id"])
    def test_another_user_gets_not_found_on_every_rpc(self, api, conn, ownerless, function,
                                                      sub) -> None:
        before = task_row(conn, ownerless)
        theirs = _sqlstate(lambda: api.rpc("authenticated", function, sub, task_id=ownerless))
        missing = _sqlstate(lambda: api.rpc("authenticated", function, sub,
                                            task_id=str(uuid.uuid4())))
        # The same answer for "not yours" as for "does not exist"; a caller without a
        # user id is refused outright (42501), whatever the task.
        assert theirs == missing == ("PT404" if sub else "42501")
        assert task_row(conn, ownerless) == before

    def test_another_user_sees_nothing_of_it_in_tables(self, api, ownerless) -> None:
        with api.request("authenticated", USER_B) as cur:
            tasks = cur.execute("select task_id from taskman.tasks").fetchall()
            task_events = cur.execute("select task_id from taskman.task_events").fetchall()
            edited = cur.execute("update taskman.tasks set metadata = '{}' where task_id = %s",
                                 (ownerless,)).rowcount
            stats = cur.execute("select taskman.task_stats() as s").fetchone()["s"]
        assert (tasks, task_events, edited, stats["total"]) == ([], [], 0, 0)

    def test_the_service_still_acts_on_it(self, api, ownerless) -> None:
        assert api.rpc("service_role", "retry_task", task_id=ownerless)["status"] == "pending"

    @pytest.mark.parametrize("role", ["anon", "authenticated"])
    def test_a_caller_without_a_user_id_cannot_create_an_ownerless_task(self, api, conn,
                                                                         role) -> None:
        assert _sqlstate(lambda: api.rpc(role, "create_task", poll_url="https://x.example.com/"
                                         )) == "42501"
        assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 0


class TestPlantedPollHeaders:
    """Headers reach task_private only for rows really inserted, by their owner."""

    @pytest.fixture
    def a_task(self, api) -> str:
        """A's task from a plain INSERT without headers: it has no private row yet."""
        return _plain_insert(api, USER_A, poll_url="https://a.example.com/job")

    def test_another_users_conflicting_insert_changes_nothing(self, api, conn, a_task) -> None:
        before = (task_row(conn, a_task), events(conn, a_task), _private(conn))
        with pytest.raises(psycopg.Error) as err, api.request("authenticated", USER_B) as cur:
            cur.execute("insert into taskman.tasks (task_id, poll_url, poll_headers)"
                        " values (%s, 'https://b.example.com/', %s) on conflict do nothing",
                        (a_task, json.dumps(PLANTED)))
        assert err.value.sqlstate == "22023"
        assert (task_row(conn, a_task), events(conn, a_task), _private(conn)) == before
        assert _claimed_headers(conn) == {a_task: {}}

    def test_a_skipped_row_writes_no_headers_even_for_the_service(self, api, conn,
                                                                  a_task) -> None:
        with api.request("service_role") as cur:
            cur.execute("insert into taskman.tasks (task_id, poll_url, poll_headers)"
                        " values (%s, 'https://b.example.com/', %s) on conflict do nothing",
                        (a_task, json.dumps(PLANTED)))
            assert cur.rowcount == 0
        assert _private(conn) == []
        assert conn.execute("select count(*) as n from taskman_private.poll_headers_in_flight"
                            ).fetchone()["n"] == 0
        assert _claimed_headers(conn) == {a_task: {}}

    def test_an_idempotent_replay_by_insert_keeps_the_first_headers(self, api, conn) -> None:
        first = _plain_insert(api, USER_A, poll_url="https://a.example.com/job",
                              poll_headers=SECRET, idempotency_key="nightly")
        with api.request("authenticated", USER_A) as cur:
            cur.execute("insert into taskman.tasks (poll_url, poll_headers, idempotency_key)"
                        " values ('https://a.example.com/job', %s, 'nightly')"
                        " on conflict do nothing", (json.dumps(PLANTED),))
            assert cur.rowcount == 0
        assert _claimed_headers(conn) == {first: SECRET}

    def test_headers_of_inserted_rows_still_reach_the_worker(self, api, conn) -> None:
        with api.request("authenticated", USER_A) as cur:
            rows = cur.execute(
                "insert into taskman.tasks (poll_url, poll_headers) select"
                " 'https://a.example.com/' || i, jsonb_build_object('X-N', i::text)"
                " from generate_series(1, 3) i returning task_id, poll_url").fetchall()
        expected = {str(r["task_id"]): {"X-N": r["poll_url"].rsplit("/", 1)[1]} for r in rows}
        assert _claimed_headers(conn) == expected


class TestTaskIdsAreTaskmans:
    """A user cannot supply task_id, so a conflict cannot tell that someone's task exists."""

    def test_someone_elses_id_and_an_unknown_id_are_refused_alike(self, api, conn) -> None:
        a_task = _plain_insert(api, USER_A, poll_url="https://a.example.com/job")
        answers = []
        for task_id in (a_task, str(uuid.uuid4())):
            with pytest.raises(psycopg.Error) as err, api.request("authenticated",
                                                                  USER_B) as cur:
                cur.execute("insert into taskman.tasks (task_id) values (%s)", (task_id,))
            answers.append((err.value.sqlstate, err.value.diag.message_primary))
        assert answers[0] == answers[1] == ("22023", "task_id is assigned by Taskman: leave it out")
        assert conn.execute("select count(*) as n from taskman.tasks").fetchone()["n"] == 1

    def test_the_service_may_supply_one(self, api) -> None:
        task_id = str(uuid.uuid4())
        with api.request("service_role") as cur:
            cur.execute("insert into taskman.tasks (task_id) values (%s) returning task_id",
                        (task_id,))
            assert str(cur.fetchone()["task_id"]) == task_id


class TestCallbackTokens:
    @pytest.fixture
    def task(self, api) -> dict:
        return api.rpc("authenticated", "create_task", USER_A,
                       poll_body=json.dumps({"api_key": "in-the-body"}),
                       metadata=json.dumps({"customer": "acme"}),
                       callback_url="https://hooks.example.com/a", idempotency_key="k-1")

    @pytest.mark.parametrize("report", [
        {"status": "in_progress", "progress": 10},
        {"progress": 10},
        {"status": "completed", "result": json.dumps({"ok": True})},
    ])
    def test_a_token_holder_gets_only_task_id_and_status(self, api, task, report) -> None:
        answer = api.rpc("anon", "update_task", task_id=task["task_id"],
                         callback_token=task["callback_token"], **report)
        again = api.rpc("anon", "update_task", task_id=task["task_id"],
                        callback_token=task["callback_token"], **report)
        assert set(answer) == set(again) == {"task_id", "status"}
        assert answer["task_id"] == task["task_id"]

    def test_the_service_still_gets_the_whole_task(self, api, task) -> None:
        answer = api.rpc("service_role", "update_task", task_id=task["task_id"], progress=5)
        assert answer["metadata"] == {"customer": "acme"} and answer["user_id"] == USER_A

    def test_a_retry_issues_a_new_token_and_voids_the_old_one(self, api, conn, task) -> None:
        old = task["callback_token"]
        api.rpc("anon", "update_task", task_id=task["task_id"], status="failed",
                callback_token=old)
        retried = api.rpc("authenticated", "retry_task", USER_A, task_id=task["task_id"])
        new = retried["callback_token"]
        assert new and new != old and retried["status"] == "pending"

        before = task_row(conn, task["task_id"])
        forged = _sqlstate(lambda: api.rpc("anon", "update_task", task_id=task["task_id"],
                                           status="completed", callback_token=old,
                                           result=json.dumps({"forged": True})))
        profile = _sqlstate(lambda: api.rpc("anon", "callback_profile",
                                            task_id=task["task_id"], callback_token=old))
        assert forged == profile == "PT403"
        assert task_row(conn, task["task_id"]) == before

        done = api.rpc("anon", "update_task", task_id=task["task_id"], status="completed",
                       callback_token=new)
        assert done == {"task_id": task["task_id"], "status": "completed"}

    def test_a_service_retry_also_replaces_the_token(self, api, conn) -> None:
        task = create_task(conn)
        set_status(conn, task["task_id"], "failed")
        retried = api.rpc("service_role", "retry_task", task_id=task["task_id"])
        assert retried["callback_token"] != task["callback_token"]
        assert _sqlstate(lambda: api.rpc("anon", "update_task", task_id=task["task_id"],
                                         progress=1, callback_token=task["callback_token"])
                         ) == "PT403"


class TestHistoryGrowth:
    def test_repeated_calls_that_change_nothing_add_no_events(self, api, conn) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        report = {"task_id": task["task_id"], "callback_token": task["callback_token"],
                  "status": "in_progress", "progress": 40, "progress_message": "step 2"}
        api.rpc("anon", "update_task", **report)
        changed = task_row(conn, task["task_id"])
        recorded = len(events(conn, task["task_id"]))

        for _ in range(20):
            api.rpc("anon", "update_task", **report)
            api.rpc("anon", "update_task", task_id=task["task_id"],
                    callback_token=task["callback_token"])
        api.rpc("service_role", "update_task", task_id=task["task_id"], progress=40)

        assert len(events(conn, task["task_id"])) == recorded
        assert task_row(conn, task["task_id"]) == changed  # updated_at included

    def test_a_call_that_changes_something_is_still_recorded(self, api, conn) -> None:
        task = api.rpc("authenticated", "create_task", USER_A)
        for progress in (10, 20):
            api.rpc("anon", "update_task", task_id=task["task_id"], progress=progress,
                    callback_token=task["callback_token"])
        kinds = [e["event_type"] for e in events(conn, task["task_id"])]
        assert kinds == ["created", "callback_received", "callback_received"]
        assert task_row(conn, task["task_id"])["progress"] == 20


TASKMAN_SCHEMAS = ("taskman", "taskman_private")
API_ROLES = ("public", "anon", "authenticated")


def test_api_roles_hold_no_rights_on_any_sequence(conn) -> None:
    rows = conn.execute(
        "select c.oid::regclass::text as seq, r.role from pg_class c"
        " cross join unnest(%s::text[]) as r(role)"
        " where c.relkind = 'S' and c.relnamespace::regnamespace::text = any(%s)"
        " and has_sequence_privilege(r.role, c.oid, 'USAGE, SELECT, UPDATE')",
        (list(API_ROLES), list(TASKMAN_SCHEMAS))).fetchall()
    sequences = conn.execute("select count(*) as n from pg_class where relkind = 'S'"
                             " and relnamespace::regnamespace::text = any(%s)",
                             (list(TASKMAN_SCHEMAS),)).fetchone()["n"]
    assert sequences >= 2 and rows == []


def test_a_user_cannot_move_the_event_sequence(api) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            api.request("authenticated", USER_A) as cur:
        cur.execute("select setval('taskman.task_events_event_id_seq', 9223372036854775807)")


def test_api_roles_can_read_nothing_in_taskman_private(conn) -> None:
    """(What they may execute there is exactly what the RPC wrappers call: see
    test_security_advisor.)"""
    granted = conn.execute(
        "select c.oid::regclass::text as object, r.role from pg_class c"
        " cross join unnest(%(roles)s::text[]) as r(role)"
        " where c.relnamespace = 'taskman_private'::regnamespace and c.relkind = 'r'"
        " and has_table_privilege(r.role, c.oid, 'SELECT, INSERT, UPDATE, DELETE')",
        {"roles": list(API_ROLES)}).fetchall()
    assert granted == []


class TestRoleClaims:
    """A service_role claim is believed only in a session acting as service_role."""

    @pytest.mark.parametrize("role", ["anon", "authenticated"])
    def test_a_service_role_claim_under_an_api_role_is_not_the_service(self, api, conn,
                                                                       role) -> None:
        task = create_task(conn)
        before = task_row(conn, task["task_id"])

        def call(function: str, **args) -> None:
            named = ", ".join(f"{k} => %({k})s" for k in args)
            with db.api_session(api.conn, role, {"role": "service_role"}) as cur:
                cur.execute(f"select taskman.{function}({named})", args)

        assert _sqlstate(lambda: call("update_task", task_id=task["task_id"],
                                      status="completed")) == "PT403"
        if role == "authenticated":  # neither the service nor a user: refused outright
            assert _sqlstate(lambda: call("get_task_status", task_id=task["task_id"])) == "42501"
            assert _sqlstate(lambda: call("cancel_task", task_id=task["task_id"])) == "42501"
        assert task_row(conn, task["task_id"]) == before

    def test_the_service_role_session_is_the_service(self, api, conn) -> None:
        task = create_task(conn)
        with db.api_session(api.conn, "service_role", {"role": "service_role"}) as cur:
            cur.execute("select taskman.get_task_status(%s) as s", (task["task_id"],))
            assert cur.fetchone()["s"]["status"] == "pending"



def test_a_client_setting_the_poll_writer_flag_still_goes_through_the_checks(api, conn) -> None:
    # record_poll_results marks its own writes with taskman.poll_writer; a signed-in
    # client that sets it on its session's write is checked and recorded as any other.
    task = api.rpc("authenticated", "create_task", USER_A, poll_url="https://api.example.com/s")
    before = task_row(conn, task["task_id"])

    def write(metadata: str) -> None:
        with api.request("authenticated", USER_A) as cur:
            cur.execute("select set_config('taskman.poll_writer', 'on', true)")
            cur.execute("update taskman.tasks set metadata = %s::jsonb where task_id = %s",
                        (metadata, task["task_id"]))

    assert _sqlstate(lambda: write("[1, 2]")) == "22023"
    assert task_row(conn, task["task_id"]) == before
    write('{"note": "kept"}')
    after = task_row(conn, task["task_id"])
    assert after["metadata"] == {"note": "kept"} and after["updated_at"] > before["updated_at"]
