"""Owners share the worker: the claim takes due tasks in turns of owners, priority orders
only an owner's own tasks, and one owner's backlog hides nobody else's due task."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import USER_A, USER_B, make_due, schedule_row
from tests.remote_api import Reply
from tests.worker_harness import running_worker, wait_until
from worker.migrate import migrate

NIL = "00000000-0000-0000-0000-000000000000"


def claim(conn: psycopg.Connection[Any], batch: int) -> list[str]:
    """The claim's tasks, in the order it returns them."""
    return [str(r["task_id"]) for r in conn.execute(
        "select task_id from taskman.claim_due_tasks('w-fair', %s, 60)", (batch,))]


def tasks_of(conn: psycopg.Connection[Any], owner: str | None, count: int, *, priority: int = 0,
             poll_url: str = "https://api.example.com/b", due: str = "-1 minute",
             poll_interval_seconds: int = 30) -> list[str]:
    """`count` tasks the service makes for `owner` (None: its own) in one statement,
    through the insert triggers, due `due` from now (longest due first)."""
    rows = conn.execute(
        "insert into taskman.tasks (user_id, poll_url, priority, poll_interval_seconds)"
        " select %s, %s || '/' || i, %s, %s from generate_series(1, %s) i returning task_id",
        (owner, poll_url, priority, poll_interval_seconds, count)).fetchall()
    ids = [str(r["task_id"]) for r in rows]
    conn.execute("update taskman_private.task_schedule s"
                 " set next_poll_at = now() + %s::interval + i.n * interval '1 ms'"
                 " from unnest(%s::uuid[]) with ordinality as i(task_id, n)"
                 " where s.task_id = i.task_id", (due, ids))
    return ids


def owned_task(api: Any, user: str, **args: Any) -> str:
    return str(api.rpc("authenticated", "create_task", user,
                       poll_url=args.pop("poll_url", "https://api.example.com/a"),
                       **args)["task_id"])


def test_one_owners_ten_thousand_due_tasks_leave_another_owners_task_in_the_first_batch(
        conn, api) -> None:
    backlog = tasks_of(conn, USER_B, 10_000, priority=100, due="-1 hour")
    a_task = owned_task(api, USER_A)
    first = claim(conn, 10)
    assert a_task in first
    assert len(first) == 10 and set(first) - {a_task} <= set(backlog)
    # The backlog still takes the rest of the worker.
    assert len(set(claim(conn, 10)) & set(backlog)) == 10


def test_owners_outside_one_look_up_are_reached_by_the_next_claims(conn, api) -> None:
    # 300 owners with tasks waiting (not due), B's backlog, and A's one due task: the
    # claims look further each time until A's is found, within a few claims.
    conn.execute(
        "insert into taskman.tasks (user_id, poll_url)"
        " select gen_random_uuid(), 'https://api.example.com/w/' || i"
        " from generate_series(1, 300) i")
    conn.execute("update taskman_private.task_schedule"
                 " set next_poll_at = now() + interval '1 hour'")
    backlog = tasks_of(conn, USER_B, 2_000, priority=100, due="-1 hour")
    a_task = owned_task(api, USER_A)
    claims = [claim(conn, 5) for _ in range(8)]
    found = [i for i, batch in enumerate(claims) if a_task in batch]
    assert found and found[0] < 8
    assert all(set(batch) - {a_task} <= set(backlog) for batch in claims)


def test_a_claim_takes_each_owners_first_task_before_anyones_second(conn, api) -> None:
    b_tasks = tasks_of(conn, USER_B, 5, priority=100)
    service = tasks_of(conn, None, 5, priority=50)
    a_tasks = [owned_task(api, USER_A) for _ in range(2)]
    for task_id in a_tasks:
        make_due(conn, task_id, "-1 second")
    batch = claim(conn, 3)
    assert len(set(batch) & set(a_tasks)) == 1
    assert len({schedule_row(conn, t)["owner"] for t in batch}) == 3
    # The service's own tasks are one owner: five of them took one turn.
    assert len(set(batch) & set(service)) == 1 and len(set(batch) & set(b_tasks)) == 1


def test_claims_of_one_task_serve_the_owners_in_turn(conn, api) -> None:
    b_tasks = tasks_of(conn, USER_B, 6, priority=100)
    a_tasks = [owned_task(api, USER_A) for _ in range(6)]
    for task_id in a_tasks:
        make_due(conn, task_id, "-1 second")
    owners = [str(schedule_row(conn, claim(conn, 1)[0])["owner"]) for _ in range(8)]
    assert sorted(owners) == sorted([USER_A] * 4 + [USER_B] * 4)
    assert all(x != y for x, y in itertools.pairwise(owners))  # alternating
    assert len(b_tasks) == len(a_tasks) == 6


def test_priority_orders_an_owners_own_tasks_then_the_longest_due(conn, api) -> None:
    low = tasks_of(conn, USER_B, 3, priority=0, due="-1 hour")  # due longest
    high = tasks_of(conn, USER_B, 2, priority=90, due="-1 minute")
    negative = tasks_of(conn, USER_B, 1, priority=-5, due="-2 hours")
    assert claim(conn, 6) == [*high, *low, *negative]


def test_priority_does_not_give_an_owner_a_turn_before_another(conn, api) -> None:
    tasks_of(conn, USER_B, 50, priority=100, due="-1 hour")
    a_task = owned_task(api, USER_A, priority=-100)
    assert a_task in claim(conn, 2)


def test_a_task_the_service_makes_for_a_user_takes_the_users_turns(conn, api) -> None:
    made_for_b = tasks_of(conn, USER_B, 3)
    b_own = owned_task(api, USER_B)
    own = tasks_of(conn, None, 1)[0]
    assert {str(schedule_row(conn, t)["owner"]) for t in [*made_for_b, b_own]} == {USER_B}
    assert str(schedule_row(conn, own)["owner"]) == NIL
    # Given to another owner later, it takes that owner's turns.
    conn.execute("update taskman.tasks set user_id = %s where task_id = %s", (USER_A, own))
    assert str(schedule_row(conn, own)["owner"]) == USER_A
    make_due(conn, b_own, "-1 minute")
    make_due(conn, own, "-1 second")
    assert own in claim(conn, 2)


def test_concurrent_claims_stay_disjoint_in_turns_of_owners(conn, database_url) -> None:
    for owner in (USER_A, USER_B, None):
        tasks_of(conn, owner, 40)
    with psycopg.connect(database_url, autocommit=True) as other:
        seen: list[str] = []
        with conn.transaction(), other.transaction():
            first = claim(conn, 30)
            second = [str(r[0]) for r in other.execute(
                "select task_id from taskman.claim_due_tasks('w-other', 30, 60)")]
            seen = first + second
        assert len(seen) == len(set(seen)) == 60


# Four slots for 25 tasks: B's slow tasks alone keep the worker busy.
BUSY_WORKER = {"TASKMAN_CONCURRENCY": "4", "TASKMAN_MIN_POLL_INTERVAL": "1",
               "TASKMAN_MAX_POLL_INTERVAL": "1"}


def test_a_busy_owners_slow_tasks_at_priority_100_leave_another_owner_polled(
        api, database_url, remote) -> None:
    slow = Reply(json={"status": "running"}, delay=0.5)
    for i in range(24):
        remote.script(f"/b/{i}", slow)
    b_urls = [remote.url(f"/b/{i}") for i in range(24)]
    for url in b_urls:
        api.rpc("authenticated", "create_task", USER_B, poll_url=url, priority=100,
                poll_interval_seconds=1)
    a_url = remote.script("/a", Reply(json={"status": "running"}))
    with running_worker(database_url, **BUSY_WORKER):
        # B saturates the worker first.
        wait_until(lambda: len(remote.hits()) >= 24, timeout=15)
        owned_task(api, USER_A, poll_url=a_url, poll_interval_seconds=1)
        started = time.monotonic()
        time.sleep(6)
        a_polls = [h for h in remote.hits("/a") if h.at >= started]
        b_polls = [h for h in remote.hits() if h.path.startswith("/b/") and h.at >= started]
    # A's task is polled about once a second, as if B were not there (before owners
    # took turns: not once); B keeps the other slots.
    assert len(a_polls) >= 4, (len(a_polls), len(b_polls))
    assert len(b_polls) >= 20


def test_upgrading_gives_existing_tasks_their_owners_and_turns(server_url, tmp_path) -> None:
    with database_before(server_url, "20261207001000", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as c:
            backlog = tasks_of(c, USER_B, 300, priority=100, due="-1 hour")
            a_task = tasks_of(c, USER_A, 1, due="-1 second")[0]
            own = tasks_of(c, None, 1, due="-2 seconds")[0]
            done = tasks_of(c, str(uuid.uuid4()), 1)[0]
            c.execute("update taskman.tasks set status = 'completed' where task_id = %s",
                      (done,))
            leased = claim(c, 1)
            assert leased[0] in backlog  # before: priority across owners
        assert [m.version for m in migrate(url)][:1] == ["20261207001000"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as c:
            owners = {t: str(schedule_row(c, t)["owner"]) for t in (backlog[0], a_task, own)}
            assert owners == {backlog[0]: USER_B, a_task: USER_A, own: NIL}
            assert schedule_row(c, leased[0])["lease_owner"] == "w-fair"
            batch = claim(c, 3)
            assert a_task in batch and own in batch and leased[0] not in batch
            # A task made after the upgrade gets its owner too.
            new = tasks_of(c, USER_A, 1)[0]
            assert str(schedule_row(c, new)["owner"]) == USER_A
