"""Hosts are shared, their verdicts are not: what one owner's tasks meet on a host (a
Retry-After of a day, a run of failures) holds that owner's tasks only; the host's own
circuit opens only when it fails for more than one owner, and then it is tight. Against a
real worker, real servers on 127.0.0.1 and a real database."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import psycopg

from tests.factories import USER_A, USER_B, create_task, schedule_row
from tests.remote_api import Reply, remote_api
from tests.test_hosts import BREAKER, DONE, host_row
from tests.worker_harness import running_worker, wait_until
from worker.remote.host_keys import host_key

USER_C = str(uuid.UUID("cccccccc-0000-4000-8000-000000000003"))
RUNNING = Reply(json={"status": "running"})
# Polled every 0.1 s while it runs (the test floor is 0.05 s).
EVERY_TENTH = {"poll_interval_seconds": 1, "poll_config": {"interval_seconds": 0.1}}


def create_as(api, user: str, **args) -> str:
    """A task created by `user` through the API, as PostgREST would."""
    named = ", ".join(f"{k} => %({k})s" for k in args)
    values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in args.items()}
    with api.request("authenticated", user) as cur:
        cur.execute(f"select taskman.create_task({named}) as r", values)
        return str(cur.fetchone()["r"]["task_id"])


def polls_between(remote, path: str, start: float, end: float) -> int:
    return sum(1 for h in remote.hits(path) if start <= h.at < end)


def owner_row(conn: psycopg.Connection, key: str, user: str | None) -> dict | None:
    return host_row(conn, f"{key}#{user or 'service'}")


def test_one_owners_retry_after_of_a_day_leaves_another_owners_polling_alone(
        conn, api, database_url, remote) -> None:
    key = host_key(remote.url())
    remote.script("/a", RUNNING)
    remote.script("/b", Reply(429, headers={"Retry-After": "86400"}, json={"error": "slow down"}))
    with running_worker(database_url, **BREAKER, TASKMAN_HOST_MAX_PAUSE="30"):
        create_as(api, USER_A, poll_url=remote.url("/a"), poll_interval_seconds=1)
        wait_until(lambda: remote.hits("/a"))
        start = time.monotonic()
        b = create_as(api, USER_B, poll_url=remote.url("/b"))
        wait_until(lambda: (row := owner_row(conn, key, USER_B)) and row["paused_until"])
        paused_at = time.monotonic()
        time.sleep(6)
        end = time.monotonic()

    # A keeps its pace (one poll a second, a loaded machine's latency aside) after B's 429;
    # before, A got 0 polls in 12 s.
    assert polls_between(remote, "/a", paused_at, end) >= 3
    assert polls_between(remote, "/a", start, end) >= 4
    paused = owner_row(conn, key, USER_B)
    now = conn.execute("select now() as n").fetchone()["n"]
    assert 20 < (paused["paused_until"] - now).total_seconds() <= 30  # capped at the setting
    # Only B's row is paused: the host's own, and A's, hold nothing.
    assert host_row(conn, key)["paused_until"] is None and host_row(conn, key)["state"] == "closed"
    assert owner_row(conn, key, USER_A) is None
    assert len(remote.hits("/b")) == 1  # B's own task waits for its pause
    assert schedule_row(conn, b)["error_count"] == 0


def test_one_owners_failing_tasks_open_only_that_owners_circuit(conn, api, database_url,
                                                                remote) -> None:
    key = host_key(remote.url())
    remote.script("/a", RUNNING)
    remote.default = Reply(503, json={"error": "unavailable"})
    with running_worker(database_url, **BREAKER):
        create_as(api, USER_A, poll_url=remote.url("/a"), poll_interval_seconds=1)
        wait_until(lambda: remote.hits("/a"))
        for i in range(10):
            create_as(api, USER_B, poll_url=remote.url(f"/b/{i}"), max_attempts=1000)
        wait_until(lambda: (row := owner_row(conn, key, USER_B)) and row["state"] == "open")
        opened_at = time.monotonic()
        time.sleep(3)
        end = time.monotonic()
        b_hits_after = sum(1 for h in remote.hits() if h.path.startswith("/b/")
                           and h.at > opened_at + 0.2)

    assert polls_between(remote, "/a", opened_at, end) >= 2  # A's pace, unchanged
    assert host_row(conn, key)["state"] == "closed"  # one owner's failures: not the host's
    assert owner_row(conn, key, USER_A) is None
    # B's own circuit holds B's tasks: only its probes go out (cool-down 0.25 s to 0.6 s).
    assert b_hits_after <= 12


def test_a_host_down_for_two_owners_opens_for_all_and_is_tight(conn, api, database_url,
                                                               remote) -> None:
    """The outage: 40 tasks of each of two owners on a host answering 503 for 3 s, 20 on
    a healthy one. Once an owner's circuit trips, what the worker claimed for it is not
    sent: at most threshold + per-host concurrency requests an owner before it opens,
    then probes."""
    key = host_key(remote.url())
    remote.default = Reply(503, json={"error": "unavailable"})
    threshold, per_host = 3, 4
    settings = {**BREAKER, "TASKMAN_PER_HOST_CONCURRENCY": str(per_host),
                "TASKMAN_HOST_FAILURE_THRESHOLD": str(threshold)}
    with remote_api(DONE) as healthy, running_worker(database_url, **settings):
        down = [create_as(api, user, poll_url=remote.url(f"/down/{user[:1]}{i}"),
                          max_attempts=1000, poll_interval_seconds=1)
                for i in range(40) for user in (USER_A, USER_B)]
        up = [create_task(conn, poll_url=healthy.url(f"/up/{i}"))["task_id"] for i in range(20)]
        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        time.sleep(3)
        during = [h for h in remote.hits() if h.path.startswith("/down/")]
        remote.default = DONE
        wait_until(lambda: conn.execute(
            "select count(*) as n from taskman.tasks where task_id = any(%s)"
            " and status = 'completed'", (down + up,)).fetchone()["n"] == 100, timeout=30)
        healthy_key = host_key(healthy.url())

    a_row, b_row = owner_row(conn, key, USER_A), owner_row(conn, key, USER_B)
    shared = host_row(conn, key)
    assert shared["state"] == "closed" and shared["opened_at"] is not None
    for row in (a_row, b_row):
        assert row["state"] == "closed" and row["opened_at"] is not None
    for user, row in (("a", a_row), ("b", b_row)):
        opened = row["opened_at"].timestamp()
        mine = [_wall(h.at) - opened for h in during if h.path.startswith(f"/down/{user}")]
        # Before its circuit opened: the threshold's failures and what was in flight.
        assert len([t for t in mine if t < 0]) <= threshold + per_host, (user, mine)
        # Then nothing it had claimed: only probes, the first after a cool-down of
        # 0.125-0.25 s (its own, or the host's). Without the worker's own count, its
        # claimed tasks went on being sent: about ten in this window.
        assert len([t for t in mine if 0.02 < t < 0.35]) <= 2, (user, mine)
    # Three circuits (A's, B's, the host's) probing for 3 s, cool-downs up to 0.6 s.
    assert len(during) <= 2 * (threshold + per_host) + 15, len(during)
    assert healthy_key not in {h["base"] for h in conn.execute(
        "select base from taskman_private.hosts")}


def _wall(monotonic_at: float) -> float:
    """A Hit's monotonic time on the wall clock (the database's timestamps)."""
    return time.time() - (time.monotonic() - monotonic_at)


def test_an_owner_whose_requests_keep_failing_never_takes_the_hosts_probe(conn, api) -> None:
    """B and C open the host's circuit; of the tasks due at its probe, A's goes (its own
    circuit is closed), and its answer closes the host for everyone."""
    key = "https://api.example.com:443"
    tasks = {user: create_as(api, user, poll_url=f"{key}/jobs/{user[:1]}")
             for user in (USER_B, USER_C, USER_A)}
    failures = [{"task_id": tasks[u], "host": key, "owner": u, "result": "failure"}
                for u in (USER_B, USER_C)]
    conn.execute("select taskman.record_host_outcomes('w', %s, 1, 0.05, 0.05)",
                 (json.dumps(failures),))
    assert host_row(conn, key)["state"] == "open"
    time.sleep(0.1)  # every probe is due: the host's, B's and C's
    conn.execute("update taskman_private.task_schedule set next_poll_at = now()")
    rows = conn.execute("select task_id::text as task_id, held from"
                        " taskman.claim_admitted_tasks('w', 100, 60, 60, 60)").fetchall()
    sent = {r["task_id"] for r in rows if not r["held"]}
    assert sent == {tasks[USER_A]}
    conn.execute("select taskman.record_host_outcomes('w', %s, 1, 60, 60)",
                 (json.dumps([{"task_id": tasks[USER_A], "host": key, "owner": USER_A,
                               "result": "success"}]),))
    assert host_row(conn, key)["state"] == "closed"
    assert [owner_row(conn, key, u)["state"] for u in (USER_B, USER_C)] == ["open", "open"]


def test_a_rate_limited_hosts_slots_go_to_owners_in_turns(conn, api) -> None:
    key = "https://limited.example.com:443"
    conn.execute("select taskman.set_host_limits(%s)", (json.dumps({key: 1}),))
    b_tasks = [create_as(api, USER_B, poll_url=f"{key}/b/{i}") for i in range(10)]
    a_task = create_as(api, USER_A, poll_url=f"{key}/a")
    conn.execute("select taskman.claim_admitted_tasks('w', 100, 60)")
    slots = {t: schedule_row(conn, t)["host_slot_at"] for t in [*b_tasks, a_task]}
    later = sorted(s for s in slots.values() if s is not None)
    assert len(later) == 10  # one goes now, the rest a second apart
    # A's task is among the first two, not behind B's ten.
    assert slots[a_task] is None or slots[a_task] <= later[0]


def test_users_see_only_what_their_own_requests_met(conn, api) -> None:
    """A parked task (never sent) shows its owner nothing of a host: not the failures
    other owners' tasks met there, not the operator's rate limit."""
    key, limited = "https://shared.example.com:443", "https://limited.example.com:443"
    parked = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC).isoformat()
    for url in (f"{key}/a", f"{limited}/a"):
        create_as(api, USER_A, poll_url=url, start_at=parked)
    b_task = create_as(api, USER_B, poll_url=f"{key}/b")
    c_task = create_as(api, USER_C, poll_url=f"{key}/c")
    conn.execute("select taskman.set_host_limits(%s)", (json.dumps({limited: 2}),))
    failures = [{"task_id": t, "host": key, "owner": u, "result": "failure",
                 "error": "http_401"} for t, u in ((b_task, USER_B), (c_task, USER_C))]
    conn.execute("select taskman.record_host_outcomes('w', %s, 1)", (json.dumps(failures),))
    assert host_row(conn, key)["state"] == "open"

    assert api.rpc("authenticated", "host_status", USER_A) == []
    [b_view] = api.rpc("authenticated", "host_status", USER_B)
    assert (b_view["host"], b_view["state"], b_view["last_error"], b_view["rate_limit"],
            b_view["tasks_waiting"]) == (key, "open", "http_401", None, 1)
    everything = {h["host"]: h for h in
                  conn.execute("select taskman.host_status() as s").fetchone()["s"]}
    assert everything[key]["owners_held"] == 2 and everything[limited]["rate_limit"] == 2


def test_a_workers_own_count_holds_claims_until_the_record_and_then_forgets() -> None:
    """LocalCircuits: a tripped owner withholds what was claimed before its record
    committed, not what was claimed after; a count no waiting claim needs is dropped."""
    from worker.polling.hosts import LocalCircuits
    circuits = LocalCircuits(threshold=2, lease_seconds=0.05)
    failure, host = {"http_status": 503}, "https://h.example.com:443"
    claimed_before = time.monotonic()
    circuits.observe(host, USER_B, failure)
    circuits.observe(host, USER_C, failure)  # one failure: C below the threshold
    assert not circuits.withheld(host, USER_B, claimed_before)
    circuits.observe(host, USER_B, failure)
    assert circuits.withheld(host, USER_B, claimed_before)
    assert not circuits.withheld(host, USER_A, claimed_before)  # one owner: not the host's
    circuits.recorded(3)
    assert circuits.withheld(host, USER_B, claimed_before)
    assert not circuits.withheld(host, USER_B, time.monotonic())  # admitted knowing it
    time.sleep(0.1)
    circuits.recorded(3)
    assert circuits._runs == {}  # B settled and C's lone failure, both older than a lease
