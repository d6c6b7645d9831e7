"""Taskman's Realtime topics stay their owner's to read and Taskman's to write, even in a
project that also has the permissive policies of Supabase's Broadcast guide.

Realtime authorizes a private channel as PostgREST runs a request: one transaction with
the user's role and JWT claims set locally and the channel's topic in `realtime.topic`;
it reads (after inserting, as itself, a probe message on the topic) and inserts as the
user, then rolls back."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.conftest import database_before
from tests.factories import USER_A, USER_B
from tests.supabase_realtime import emulate_supabase_realtime
from worker.migrate import migrate

# Supabase's Broadcast guide, and the table rights a Supabase project gives its roles.
GUIDE_POLICIES = """
grant select, insert, update, delete on realtime.messages to anon, authenticated;
create policy "Authenticated users can receive broadcasts" on realtime.messages
  for select to authenticated using (true);
create policy "Authenticated users can send broadcasts" on realtime.messages
  for insert to authenticated with check (true);
"""
TOPIC_A = f"taskman:tasks:{USER_A}"


@pytest.fixture
def project(conn, api):
    """A Supabase project in broadcast mode with the guide's policies, and a task of A's."""
    emulate_supabase_realtime(conn)
    conn.execute(GUIDE_POLICIES)
    conn.execute("select taskman.set_realtime_mode('broadcast')")
    api.rpc("authenticated", "create_task", USER_A, poll_url="https://api.example.com/jobs/1")
    return conn


def _as_realtime(api, who: str | None, topic: str, sql: str, *args) -> list[dict]:
    """`sql` as Realtime runs its channel check for `who` on `topic` (rolled back)."""
    conn = api.conn
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        role = "authenticated" if who else "anon"
        cur.execute(f"set local role {role}")
        claims = {"role": role, **({"sub": who} if who else {})}
        cur.execute("select set_config('request.jwt.claims', %s, true),"
                    " set_config('realtime.topic', %s, true)", (json.dumps(claims), topic))
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []


def _read(api, who: str | None, topic: str) -> int:
    return _as_realtime(api, who, topic, "select count(*) as n from realtime.messages"
                        " where topic = realtime.topic()")[0]["n"]


def _send(api, who: str | None, topic: str) -> None:
    _as_realtime(api, who, topic,
                 "insert into realtime.messages (topic, extension, event, payload, private)"
                 " values (realtime.topic(), 'broadcast', 'UPDATE',"
                 " '{\"status\": \"completed\", \"result\": {\"forged\": true}}', true)")


def test_another_user_cannot_receive_an_owners_topic(project, api) -> None:
    assert _read(api, USER_A, TOPIC_A) == 1  # Taskman's INSERT message
    assert _read(api, USER_B, TOPIC_A) == 0
    assert _read(api, None, TOPIC_A) == 0
    # Nor by reading the table whatever the channel: B sees no row of any Taskman topic.
    seen = _as_realtime(api, USER_B, "room:lobby",
                        "select topic from realtime.messages where topic like 'taskman:%%'")
    assert seen == []


def test_no_one_but_taskman_sends_on_a_taskman_topic(project, api, conn) -> None:
    for who, topic in ((USER_B, TOPIC_A), (USER_A, TOPIC_A), (None, TOPIC_A),
                       (USER_B, f"taskman:tasks:{USER_B}"), (USER_B, "taskman:anything")):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _send(api, who, topic)
    for sql in ("update realtime.messages set payload = '{}' where topic = realtime.topic()",
                "delete from realtime.messages where topic = realtime.topic()"):
        _as_realtime(api, USER_A, TOPIC_A, sql)  # finds nothing it may touch
    assert conn.execute("select count(*) as n, min(payload ->> 'status') as status"
                        " from realtime.messages where topic = %s",
                        (TOPIC_A,)).fetchone() == {"n": 1, "status": "pending"}


def test_the_owner_still_receives_what_taskman_sends(project, api) -> None:
    with api.request("authenticated", USER_A) as cur:
        cur.execute("update taskman.tasks set metadata = '{\"step\": 2}'")
    assert _read(api, USER_A, TOPIC_A) == 2
    assert _read(api, USER_B, TOPIC_A) == 0


def test_other_topics_follow_the_projects_own_policies(project, api, conn) -> None:
    _send(api, USER_B, "room:lobby")  # the guide's policies allow it
    conn.execute("insert into realtime.messages (topic, extension, payload)"
                     " values ('room:lobby', 'broadcast', '{}')")
    assert _read(api, USER_A, "room:lobby") == 1
    assert _read(api, USER_B, "room:lobby") == 1
    assert _read(api, None, "room:lobby") == 0  # the guide lets only authenticated in


def test_changes_mode_drops_the_policies_and_broadcast_makes_them_again(project, api,
                                                                        conn) -> None:
    def taskman_policies() -> set[str]:
        return {r["policyname"] for r in conn.execute(
            "select policyname from pg_policies where schemaname = 'realtime'"
            " and policyname like 'Taskman%%'")}

    assert len(taskman_policies()) == 2
    conn.execute("select taskman.set_realtime_mode('changes')")
    assert taskman_policies() == set()
    conn.execute("select taskman.set_realtime_mode('broadcast')")
    assert len(taskman_policies()) == 2
    assert _read(api, USER_B, TOPIC_A) == 0


def test_a_project_already_in_broadcast_mode_gets_the_policies_on_upgrade(
        server_url, tmp_path) -> None:
    with database_before(server_url, "20261207003010", tmp_path) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            emulate_supabase_realtime(conn)
            conn.execute(GUIDE_POLICIES)
            conn.execute("select taskman.set_realtime_mode('broadcast')")
            conn.execute("insert into realtime.messages (topic, extension, payload)"
                         " values (%s, 'broadcast', '{}')", (TOPIC_A,))
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn, \
                conn.transaction(force_rollback=True):
            conn.execute("set local role authenticated")
            conn.execute("select set_config('request.jwt.claims', %s, true)",
                         (json.dumps({"role": "authenticated", "sub": USER_B}),))
            seen = conn.execute("select count(*) from realtime.messages").fetchone()[0]
    assert seen == 0
