"""Task ids are UUIDv7 (RFC 9562): time-ordered, so a new task's index entries go beside
the last one's, and random enough below the time that one id tells nothing of another."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest

from tests.conftest import database_before
from tests.factories import USER_A, USER_B, create_task
from worker.migrate import migrate

# What PostgREST runs for GET /rest/v1/tasks?select=*,task_events(*) (schema taskman).
EMBEDDED = """
select "tasks".*, coalesce("tasks_task_events_1"."tasks_task_events_1", '[]') as "task_events"
from "taskman"."tasks"
left join lateral (
  select json_agg("tasks_task_events_1")::jsonb as "tasks_task_events_1"
  from (select "task_events_1".* from "taskman"."task_events" as "task_events_1"
        where "task_events_1"."task_id" = "taskman"."tasks"."task_id") as "tasks_task_events_1"
) as "tasks_task_events_1" on true
"""


def _time(task_id: uuid.UUID) -> datetime:
    """The creation time a UUIDv7 carries (its first 48 bits: Unix milliseconds)."""
    return datetime.fromtimestamp((task_id.int >> 80) / 1000).astimezone()


def _assert_v7(task_id: uuid.UUID) -> None:
    assert task_id.version == 7 and task_id.variant == uuid.RFC_4122, task_id


def test_tasks_created_one_after_another_get_ids_in_creation_order(api) -> None:
    """Through create_task and a plain INSERT (POST /tasks) alike, as a signed-in user."""
    made = []
    for i in range(30):
        if i % 2:
            made.append(api.rpc("authenticated", "create_task", sub=USER_A,
                                poll_url=f"https://api.example.com/status/{i}")["task_id"])
        else:
            with api.request("authenticated", USER_A) as cur:
                made.append(cur.execute("insert into taskman.tasks (poll_url) values (%s)"
                                        " returning task_id",
                                        (f"https://api.example.com/status/{i}",)).fetchone()
                            ["task_id"])
    ids = [uuid.UUID(str(i)) for i in made]
    for task_id in ids:
        _assert_v7(task_id)
    assert sorted(ids) == ids
    with api.request("authenticated", USER_A) as cur:
        created = {r["task_id"]: r["created_at"] for r in cur.execute(
            "select task_id, created_at from taskman.tasks").fetchall()}
    for task_id in ids:
        # Minted in the creating transaction, after its now() (created_at).
        lag = _time(task_id) - created[task_id]
        assert timedelta(milliseconds=-1) < lag < timedelta(seconds=5)


def test_the_server_reads_the_ids_as_version_7(conn) -> None:
    """Where PostgreSQL reads UUID fields (17 and later), it finds the version and time."""
    if conn.info.server_version < 170000:
        pytest.skip("uuid_extract_version() and uuid_extract_timestamp() arrived in 17")
    row = conn.execute(
        "select uuid_extract_version(t.task_id) as version,"
        " uuid_extract_timestamp(t.task_id) - t.created_at as lag"
        " from taskman.tasks t where t.task_id = %s",
        (create_task(conn)["task_id"],)).fetchone()
    assert row["version"] == 7 and timedelta(milliseconds=-1) < row["lag"] < timedelta(seconds=5)


def test_ids_made_at_once_are_unique_and_unpredictable(conn) -> None:
    """Thousands in one statement (most in the same millisecond): all differ, and each of
    the 62 random bits below the time is set in about half of them."""
    ids = [uuid.UUID(str(r["id"])) for r in conn.execute(
        "select taskman_private.uuidv7() as id from generate_series(1, 4000)").fetchall()]
    assert len(set(ids)) == len(ids)
    for task_id in ids:
        _assert_v7(task_id)
    clock = [i.int >> 64 for i in ids]  # the time to the sub-millisecond, and the version
    assert clock == sorted(clock)
    for bit in range(62):
        share = sum(i.int >> bit & 1 for i in ids) / len(ids)
        assert 0.4 < share < 0.6, (bit, share)  # 0.5 +- 9 standard deviations


def test_concurrent_creates_never_share_an_id(database_url: str) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def create_many(n: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as c:
            made = [c.execute("select taskman.create_task(poll_url =>"
                              " 'https://api.example.com/status/1') ->> 'task_id'").fetchone()[0]
                    for _ in range(n)]
        with lock:
            ids.extend(made)

    threads = [threading.Thread(target=create_many, args=(150,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == len(ids) == 600
    with psycopg.connect(database_url) as c:
        assert c.execute("select count(distinct task_id) from taskman.tasks").fetchone()[0] == 600


def test_the_service_still_chooses_a_task_id_and_a_user_cannot(conn, api) -> None:
    chosen = "3f2b8e4a-9c1d-4e5f-8a7b-6c5d4e3f2a1b"  # version 4, as many clients make
    row = conn.execute("insert into taskman.tasks (task_id, poll_url) values (%s,"
                       " 'https://api.example.com/status/1') returning task_id",
                       (chosen,)).fetchone()
    assert str(row["task_id"]) == chosen
    assert conn.execute("select count(*) as n from taskman_private.task_schedule"
                        " where task_id = %s", (chosen,)).fetchone()["n"] == 1
    with pytest.raises(psycopg.Error) as err, api.request("authenticated", USER_A) as cur:
        cur.execute("insert into taskman.tasks (task_id, poll_url) values (%s,"
                    " 'https://api.example.com/status/1')", (str(uuid.uuid4()),))
    assert err.value.sqlstate == "22023" and "task_id" in err.value.diag.message_primary


def test_a_known_id_opens_nothing_and_embedding_shows_each_owner_their_own(api) -> None:
    """Knowing another owner's id (time-ordered, so near one's own) reads nothing of it;
    tasks?select=*,task_events(*) lists one's tasks with their events only."""
    mine = api.rpc("authenticated", "create_task", sub=USER_A,
                   poll_url="https://api.example.com/status/a")["task_id"]
    theirs = api.rpc("authenticated", "create_task", sub=USER_B,
                     poll_url="https://api.example.com/status/b")["task_id"]
    with pytest.raises(psycopg.Error) as err:
        api.rpc("authenticated", "get_task_status", sub=USER_A, task_id=theirs)
    assert err.value.sqlstate == "PT404"
    with api.request("authenticated", USER_A) as cur:
        rows = cur.execute(EMBEDDED).fetchall()
    assert [str(r["task_id"]) for r in rows] == [str(mine)]
    assert [(e["task_id"], e["event_type"]) for e in rows[0]["task_events"]] == [
        (str(mine), "created")]


def test_an_upgraded_database_keeps_its_ids_and_makes_new_ones_time_ordered(
        server_url: str, tmp_path) -> None:
    with database_before(server_url, "20261208002000", tmp_path) as url:
        with psycopg.connect(url, autocommit=True) as c:
            old = c.execute("select taskman.create_task(poll_url =>"
                            " 'https://api.example.com/status/1') ->> 'task_id'").fetchone()[0]
        assert uuid.UUID(old).version == 4
        migrate(url)
        with psycopg.connect(url, autocommit=True) as c:
            new = c.execute("select taskman.create_task(poll_url =>"
                            " 'https://api.example.com/status/2') ->> 'task_id'").fetchone()[0]
            _assert_v7(uuid.UUID(new))
            assert c.execute("select taskman.get_task_status(%s) ->> 'status'",
                             (old,)).fetchone()[0] == "pending"
            claimed = {r[0] for r in c.execute(
                "select task_id::text from taskman.claim_due_tasks('w', 10, 60)").fetchall()}
            assert claimed == {old, new}
