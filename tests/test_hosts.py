"""Remote hosts shared by all workers: circuit breakers, Retry-After pauses and rate limits,
against real servers on 127.0.0.1 and a real database."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from tests.conftest import database_before
from tests.factories import create_task, events, schedule_row, task_row
from tests.remote_api import Reply, remote_api, start_receiver
from tests.test_outbox import dispatch, end_task, make_settings
from tests.worker_harness import running_worker, start_worker_process, wait_until
from worker.migrate import migrate
from worker.remote.host_keys import host_key, parse_rate_limits

DONE = Reply(json={"status": "done", "result": {"ok": True}})
# Short cool-downs: an outage of a few seconds sees a few probes.
BREAKER = {"TASKMAN_HOST_FAILURE_THRESHOLD": "3", "TASKMAN_HOST_COOLDOWN": "0.25",
           "TASKMAN_HOST_MAX_COOLDOWN": "0.6", "TASKMAN_HOST_RESUME_SPREAD": "0.3"}


def host_row(conn: psycopg.Connection, host: str) -> dict | None:
    return conn.execute("select * from taskman_private.hosts where host = %s",
                        (host,)).fetchone()


def host_alerts(conn: psycopg.Connection) -> list[dict]:
    return [r["payload"] for r in conn.execute(
        "select payload from taskman_private.outbox"
        " where task_id is null and channel = 'slack' order by outbox_id")]


def statuses(conn: psycopg.Connection, ids: list[str]) -> Counter:
    rows = conn.execute("select status, error_code from taskman.tasks where task_id = any(%s)",
                        (ids,)).fetchall()
    return Counter((r["status"], r["error_code"]) for r in rows)


@pytest.mark.parametrize("url, key", [
    ("https://API.Example.com/jobs/1", "https://api.example.com:443"),
    ("http://api.example.com/x?y=1", "http://api.example.com:80"),
    ("https://user:pw@api.example.com:8443/a", "https://api.example.com:8443"),
    ("http://127.0.0.1:0080", "http://127.0.0.1:80"),
    ("http://[::1]:9000/jobs", "http://[::1]:9000"),
    ("HTTPS://h#frag", "https://h:443"),
    ("ftp://files.example.com/x", "ftp://files.example.com"),
    ("https://h:99x/", None),
    ("not a url", None),
    ("https:///nohost", None),
])
def test_python_and_sql_derive_the_same_host_key(conn, url, key) -> None:
    assert host_key(url) == key
    assert conn.execute("select taskman_private.host_key(%s) as k", (url,)).fetchone()["k"] == key


URL_PIECES = st.tuples(
    st.sampled_from(["http", "https", "HTTPS", "ftp", "h+1", "1x"]),
    st.sampled_from(["://", ":/", "//"]),
    st.sampled_from(["", "u@", "u:p@", "@", "a@b@"]),
    st.one_of(st.sampled_from(["api.example.com", "API.Example.COM", "[::1]", "[::1", "a..b",
                               "", "x_y", "127.0.0.1", "h"]),
              st.text(alphabet="aZ09.-_:[]@%", max_size=12)),
    st.sampled_from(["", ":", ":80", ":0080", ":65536", ":1234567890", ":x", ":8443"]),
    st.sampled_from(["", "/", "/x?y#z", "?q", "#f", "/a b", "/@x", "x", ":9/"]))


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(pieces=URL_PIECES)
def test_sql_host_keys_match_the_python_ones_for_any_url(module_conn, pieces) -> None:
    """The SQL function splits plain URLs without its regular expression; both agree."""
    url = "".join(pieces)
    sql = module_conn.execute("select taskman_private.host_key(%s) as k", (url,)).fetchone()["k"]
    assert sql == host_key(url)


def test_rate_limit_setting_names_hosts_like_poll_urls() -> None:
    assert parse_rate_limits("api.example.com=5/s, http://10.0.0.7:8080=120/m,b.io:8443=2") == {
        "https://api.example.com:443": 5.0, "http://10.0.0.7:8080": 2.0,
        "https://b.io:8443": 2.0}
    for bad in ("api.example.com", "api.example.com=fast", "=5/s", "a.io=0/s", "a.io=5/h"):
        with pytest.raises(ValueError, match=r"entry|rate"):
            parse_rate_limits(bad)


def test_a_host_down_then_back_is_probed_a_few_times_and_no_task_spends_its_budget(
        conn, database_url, remote) -> None:
    remote.default = Reply(503, json={"error": "unavailable"})
    remote.stop()  # connection refused first
    key = host_key(remote.url())
    with running_worker(database_url, **BREAKER):
        with conn.transaction():
            ids = [create_task(conn, poll_url=remote.url(f"/jobs/{i}"), max_attempts=5,
                               poll_interval_seconds=1)["task_id"] for i in range(20)]
        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        time.sleep(0.2)  # the polls in flight when it opened come back
        failures_at_open = host_row(conn, key)["failures_total"]
        time.sleep(1.5)
        refused_probes = host_row(conn, key)["failures_total"] - failures_at_open
        remote.start()  # the host answers again, with 503s
        time.sleep(1.5)
        hits_during_503s = len(remote.hits())
        remote.default = DONE
        wait_until(lambda: statuses(conn, ids)[("completed", None)] == 20, timeout=20)

    assert statuses(conn, ids) == Counter({("completed", None): 20})
    # Without the breaker: 20 tasks retried every 0.05-0.2 s, about 150 polls a second.
    assert 1 <= refused_probes <= 8
    assert 1 <= hits_during_503s <= 8
    # Only the failures before the circuit opened count (none since: recovered tasks are 0).
    assert max(e["detail"]["error_count"] for i in ids for e in events(conn, i)
               if e["event_type"] == "polled" and "error_count" in e["detail"]) <= 2
    assert max(task_row(conn, i)["attempt_count"] for i in ids) <= 3
    row = host_row(conn, key)
    assert (row["state"], row["consecutive_failures"]) == ("closed", 0)
    alerts = host_alerts(conn)
    assert [(a["event"], a["host"]) for a in alerts] == [("opened", key), ("closed", key)]
    assert alerts[0]["tasks_waiting"] == 20
    assert alerts[0]["last_error"] == "connection_error"
    assert alerts[0]["since"] is not None


def test_submits_to_a_host_that_is_down_wait_for_it_too(conn, database_url, remote) -> None:
    remote.default = Reply(503)
    key = host_key(remote.url())
    with running_worker(database_url, **BREAKER):
        with conn.transaction():
            ids = [create_task(conn, poll_url=None, submit_url=remote.url(f"/v1/jobs/{i}"),
                               max_attempts=4)["task_id"] for i in range(10)]
        assert schedule_row(conn, ids[0])["host"] == key
        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        time.sleep(1.0)
        during = len(remote.hits())
        remote.default = Reply(200, json={"status": "done", "result": {"ok": True}})
        wait_until(lambda: statuses(conn, ids)[("completed", None)] == 10, timeout=20)
    assert during <= 10 + 6  # the first submits, then a few probes
    assert all(task_row(conn, i)["submitted_at"] is not None for i in ids)


def test_resumed_tasks_are_spread_out_not_sent_in_one_instant(conn, database_url,
                                                              remote) -> None:
    remote.default = Reply(503)
    key = host_key(remote.url())
    env = {**BREAKER, "TASKMAN_HOST_COOLDOWN": "0.3", "TASKMAN_HOST_MAX_COOLDOWN": "0.3",
           "TASKMAN_HOST_RESUME_SPREAD": "2"}
    with running_worker(database_url, **env):
        ids = [create_task(conn, poll_url=remote.url(f"/jobs/{i}"))["task_id"]
               for i in range(30)]
        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        remote.default = DONE
        recovered = time.monotonic()
        wait_until(lambda: statuses(conn, ids)[("completed", None)] == 30, timeout=20)
    done = sorted(h.at - recovered for h in remote.hits() if h.status == 200)
    assert len(done) >= 30
    assert done[-1] - done[0] > 0.8  # spread over the resume window, not one burst


def test_one_host_down_leaves_another_hosts_tasks_alone(conn, database_url, remote) -> None:
    remote.stop()
    down = host_key(remote.url())
    with remote_api(Reply(json={"status": "running"})) as healthy:
        with running_worker(database_url, **BREAKER):
            dead = [create_task(conn, poll_url=remote.url(f"/d/{i}"))["task_id"]
                    for i in range(10)]
            wait_until(lambda: (row := host_row(conn, down)) and row["state"] == "open")
            started = time.monotonic()
            alive = [create_task(conn, poll_url=healthy.url(f"/a/{i}"), max_attempts=2,
                                 poll_interval_seconds=1)["task_id"]
                     for i in range(10)]
            wait_until(lambda: statuses(conn, alive)[("in_progress", None)] == 10, timeout=5)
            healthy.default = DONE
            wait_until(lambda: statuses(conn, alive)[("completed", None)] == 10, timeout=10)
            took = time.monotonic() - started
        assert host_row(conn, host_key(healthy.url())) is None  # never failed: no row
    assert took < 5
    assert statuses(conn, dead) == Counter({("pending", None): 10})


def test_a_task_whose_own_answers_are_bad_fails_alone(conn, database_url, remote) -> None:
    good = remote.script("/good", DONE)
    with running_worker(database_url, **BREAKER):
        bad = [create_task(conn, poll_url=remote.url(f"/missing/{i}"))["task_id"]
               for i in range(5)]
        invalid = [create_task(conn, poll_url=remote.script(f"/junk/{i}", Reply(body=b"<html>")),
                               max_attempts=2)["task_id"] for i in range(5)]
        wait_until(lambda: statuses(conn, bad + invalid)[("failed", "poll_error")] == 5
                   and statuses(conn, invalid)[("failed", "invalid_response")] == 5)
        ok = create_task(conn, poll_url=good)["task_id"]
        wait_until(lambda: task_row(conn, ok)["status"] == "completed", timeout=5)
    assert host_row(conn, host_key(remote.url())) is None


def test_a_lone_task_on_a_dead_host_still_fails_after_its_max_attempts(conn, database_url,
                                                                       remote) -> None:
    remote.stop()
    with running_worker(database_url, **BREAKER):  # threshold 3
        task_id = create_task(conn, poll_url=remote.url("/lone"), max_attempts=3)["task_id"]
        wait_until(lambda: task_row(conn, task_id)["status"] == "failed")
    assert task_row(conn, task_id)["error_code"] == "max_attempts"
    assert host_row(conn, host_key(remote.url()))["state"] == "open"


def test_a_429_with_retry_after_pauses_the_owners_tasks_on_the_host_not_only_the_task(
        conn, database_url, remote) -> None:
    remote.script("/limited", Reply(429, headers={"Retry-After": "2"}), DONE)
    with running_worker(database_url, **BREAKER):
        first = create_task(conn, poll_url=remote.url("/limited"))["task_id"]
        # The service's own tasks here: their owner row is the one paused.
        wait_until(lambda: (row := host_row(conn, host_key(remote.url()) + "#service"))
                   and row["paused_until"] is not None)
        paused_at = time.monotonic()
        others = [create_task(conn, poll_url=remote.script(f"/other/{i}", DONE))["task_id"]
                  for i in range(5)]
        wait_until(lambda: statuses(conn, [first, *others])[("completed", None)] == 6,
                   timeout=10)
    later = [h.at - paused_at for h in remote.hits() if h.path.startswith("/other/")]
    assert min(later) > 1.5  # they waited for the pause
    assert schedule_row(conn, first)["error_count"] == 0  # no budget spent on the 429
    assert host_row(conn, host_key(remote.url()))["consecutive_failures"] == 0


def test_the_rate_limit_holds_for_three_worker_processes_together(conn, database_url, remote,
                                                                  workers) -> None:
    remote.default = DONE
    key = host_key(remote.url())
    limit = 10
    for _ in range(3):
        workers.append(start_worker_process(
            database_url, TASKMAN_HOST_RATE_LIMITS=f"{remote.url()}={limit}/s"))
    # The limit is applied by each worker's first claim.
    wait_until(lambda: (row := host_row(conn, key)) and row["rate_limit"] == limit, timeout=20)
    ids = [create_task(conn, poll_url=remote.url(f"/r/{i}"))["task_id"] for i in range(70)]
    wait_until(lambda: statuses(conn, ids)[("completed", None)] == 70, timeout=30)
    hits = sorted(h.at for h in remote.hits())
    assert len(hits) == 70
    # Slots are 1/limit apart and no task goes before its slot, so the i-th hit comes no
    # earlier than the first slot + i/limit: the seconds are counted from that first slot
    # (a first send that came late, as a cold process's may, moves no window).
    first_slot = min(at - i / limit for i, at in enumerate(hits))
    per_second = Counter(int(at - first_slot) for at in hits)
    whole_seconds = [per_second[s] for s in range(int(hits[-1] - first_slot))]
    assert len(whole_seconds) >= 5
    assert max(whole_seconds) <= limit * 1.2, per_second
    rate = (len(hits) - 1) / (hits[-1] - hits[0])
    assert limit * 0.8 <= rate <= limit * 1.2, rate
    assert host_row(conn, key)["throttled_total"] > 0
    assert all(task_row(conn, i)["attempt_count"] == 1 for i in ids)  # held: no poll counted


def test_held_tasks_still_time_out_at_their_deadline(conn, database_url, remote) -> None:
    remote.stop()
    key = host_key(remote.url())
    with running_worker(database_url, **BREAKER):
        ids = [create_task(conn, poll_url=remote.url(f"/t/{i}"))["task_id"] for i in range(5)]
        wait_until(lambda: (row := host_row(conn, key)) and row["state"] == "open")
        conn.execute("update taskman.tasks set deadline_at = now() where task_id = any(%s)",
                     (ids,))

        def all_timed_out() -> bool:
            # As the worker's sweep does; a task claimed at that instant is locked, so
            # skipped, and its turn comes at the next sweep.
            conn.execute("select taskman.expire_overdue_tasks()")
            return statuses(conn, ids) == Counter({("failed", "timeout"): 5})
        wait_until(all_timed_out, timeout=10, interval=0.2)


def test_host_functions_refuse_bad_input_with_22023(conn) -> None:
    calls = [
        ("select taskman.admit_tasks('w', '{}')", "requests"),
        ("select taskman.admit_tasks('', '[]')", "worker_id"),
        ("select taskman.admit_tasks('w', '[]', 0)", "cooldown_seconds"),
        ("select taskman.record_host_outcomes('w', '{}')", "outcomes"),
        ("""select taskman.record_host_outcomes('w', '[{"host": "h", "result": "meh"}]')""",
         "outcomes"),
        ("select taskman.record_host_outcomes('w', '[]', 0)", "failure_threshold"),
        ("select taskman.record_host_outcomes('w', '[]', 3, -1)", "cooldown_seconds"),
        ("""select taskman.set_host_limits('{"api.example.com": 5}')""", "limits"),
        ("""select taskman.set_host_limits('{"https://a.io:443": 0}')""", "limits"),
        ("""select taskman.set_host_limits('{"https://a.io:443": "5"}')""", "limits"),
        ("select taskman.reset_host('')", "host"),
    ]
    for sql, field in calls:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=field):
            conn.execute(sql)
    assert conn.execute("select count(*) as n from taskman_private.hosts").fetchone()["n"] == 0


def test_users_see_only_their_own_hosts_and_tasks_in_the_overview(conn, api) -> None:
    from tests.factories import USER_A, USER_B
    for user, url in ((USER_A, "https://a.example.com/1"), (USER_B, "https://b.example.com/1")):
        with api.request("authenticated", user) as cur:
            cur.execute("select taskman.create_task(poll_url => %s)", (url,))
    outcomes = [{"host": h, "result": "failure"} for h in
                ("https://a.example.com:443", "https://b.example.com:443")]
    conn.execute("select taskman.record_host_outcomes('w', %s, 1)", (json.dumps(outcomes),))
    seen = api.rpc("authenticated", "host_status", USER_A)
    assert [(h["host"], h["state"], h["tasks_waiting"]) for h in seen] == [
        ("https://a.example.com:443", "open", 1)]
    everything = conn.execute("select taskman.host_status() as s").fetchone()["s"]
    assert {h["host"] for h in everything} == {"https://a.example.com:443",
                                               "https://b.example.com:443"}
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api.rpc("authenticated", "reset_host", USER_A, host="https://a.example.com:443")


def test_an_outage_sends_one_slack_message_on_open_and_one_on_close(conn, database_url) -> None:
    receiver = start_receiver(answer="ok")
    try:
        settings = make_settings(receiver)
        host = "https://api.example.com:443"
        for _ in range(4):
            create_task(conn)
        failed = [create_task(conn)["task_id"] for _ in range(2)]
        failures = [{"host": host, "result": "failure", "error": "connection_error"}] * 5
        for _ in range(2):  # more failures while open: still one alert
            conn.execute("select taskman.record_host_outcomes('w', %s, 3)",
                         (json.dumps(failures),))
        for task_id in failed:  # tasks failing during the outage: the digest as before
            end_task(conn, task_id, "failed")
        assert dispatch(database_url, settings).delivered == 3
        conn.execute("select taskman.record_host_outcomes('w', %s, 3)",
                     (json.dumps([{"host": host, "result": "success"}]),))
        assert dispatch(database_url, settings).delivered == 1
        texts = [h.json()["text"] for h in receiver.hits()]
    finally:
        receiver.stop()
    opened, digest, closed = (next(t for t in texts if "is failing" in t),
                              next(t for t in texts if "2 tasks failed" in t), texts[-1])
    assert len(texts) == 3
    assert host in opened and "connection_error" in opened and "6 tasks wait" in opened
    assert re.search(r"open since 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC", opened)
    assert all(i in digest for i in failed)
    assert host in closed and "circuit is closed" in closed and "4 tasks resume" in closed


def test_gating_and_holding_tasks_write_nothing_subscribers_receive(
        conn, decoding) -> None:
    host = "https://api.example.com:443"
    ids = [create_task(conn)["task_id"] for _ in range(5)]
    failures = [{"task_id": i, "host": host, "result": "failure"} for i in ids]

    def claim_and_admit() -> list[str]:
        claimed = [str(r["task_id"]) for r in conn.execute(
            "select task_id from taskman.claim_due_tasks('w1', 100, 60)")]
        requests = json.dumps([{"task_id": t, "host": host} for t in claimed])
        held = {r["h"] for r in conn.execute(
            "select h::text from taskman.admit_tasks('w1', %s, 0.05, 0.05) as h", (requests,))}
        return [t for t in claimed if t not in held]

    decoding()  # the inserts
    assert len(claim_and_admit()) == 5  # no host row yet: all go
    conn.execute("select taskman.record_host_outcomes('w1', %s, 3, 1, 1)",
                 (json.dumps(failures),))
    conn.execute("update taskman_private.task_schedule set next_poll_at = now()")
    assert claim_and_admit() == []  # open, probe not due: all held
    time.sleep(1.1)
    conn.execute("update taskman_private.task_schedule set next_poll_at = now()")
    [probe] = claim_and_admit()
    conn.execute("select taskman.record_host_outcomes('w1', %s, 3)",
                 (json.dumps([{"task_id": probe, "host": host, "result": "failure"}]),))
    assert schedule_row(conn, probe)["lease_owner"] is None  # held back, released
    conn.execute("select taskman.reset_host(%s)", (host,))
    conn.execute("select taskman.set_host_limits(%s)", (json.dumps({host: 1}),))
    conn.execute("update taskman_private.task_schedule set next_poll_at = now()")
    assert len(claim_and_admit()) == 1  # one slot now, the others later
    assert decoding() == []


def test_upgrading_a_database_with_tasks_keys_their_schedules_by_host(server_url,
                                                                     tmp_path) -> None:
    with database_before(server_url, "20261201001200", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            live = create_task(conn, poll_url="https://API.example.com/jobs/1")["task_id"]
            waiting = create_task(conn, poll_url=None, task_type="callback")["task_id"]
            done = create_task(conn, poll_url="http://other.example.com:8080/j")["task_id"]
            conn.execute("select taskman.update_task(%s, 'failed')", (done,))
        migrate(url)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            hosts = {str(r["task_id"]): r["host"] for r in conn.execute(
                "select task_id, host from taskman_private.task_schedule")}
            assert hosts == {live: "https://api.example.com:443", waiting: None,
                             done: "http://other.example.com:8080"}
            conn.execute("update taskman.tasks set poll_url = 'https://new.example.com/x'"
                         " where task_id = %s", (waiting,))
            assert schedule_row(conn, waiting)["host"] == "https://new.example.com:443"
            [alert] = conn.execute("select channel, payload from taskman_private.outbox").fetchall()
            assert alert["channel"] == "slack"  # the failed task's alert, as before


def test_the_one_statement_claim_and_record_hold_back_what_the_host_table_says(conn) -> None:
    """The worker's claim and record (one statement each) as the two statements did: a
    rate-limited host's tasks past its slot come back held, their leases released; a
    failed poll whose host is open is not recorded; another host's task goes and
    completes."""
    down, up = "https://down.example.com:443", "https://up.example.com:443"
    conn.execute("select taskman.set_host_limits(%s)", (json.dumps({down: 0.01}),))
    down_ids = {str(create_task(conn, poll_url=f"{down}/jobs/{i}")["task_id"]) for i in range(3)}
    other = str(create_task(conn, poll_url=f"{up}/jobs/1")["task_id"])

    claimed = {str(r["task_id"]): r["held"] for r in conn.execute(
        "select task_id, held from taskman.claim_admitted_tasks('w1', 100, 60, 60, 60)")}
    assert set(claimed) == down_ids | {other}
    [sent] = [t for t in down_ids if not claimed[t]]  # one slot now, the others later
    assert not claimed[other]
    assert [schedule_row(conn, t)["lease_owner"] for t in sorted(down_ids - {sent})] == [None] * 2
    assert schedule_row(conn, sent)["lease_owner"] == "w1"

    opened = [{"task_id": t, "host": down, "result": "failure"} for t in down_ids - {sent}] * 2
    conn.execute("select taskman.record_host_outcomes('w1', %s, 3, 60, 60)", (json.dumps(opened),))
    outcomes = [{"task_id": other, "worker_id": "w1", "ok": True, "status": "completed",
                 "http_status": 200},
                {"task_id": sent, "worker_id": "w1", "ok": False, "reason": "timeout"}]
    reports = [{"task_id": other, "host": up, "result": "success"},
               {"task_id": sent, "host": down, "result": "failure", "error": "timeout"}]
    recorded = conn.execute("select taskman.record_polls('w1', %s, %s, 3, 60, 60) as n",
                            (json.dumps(outcomes), json.dumps(reports))).fetchone()["n"]
    assert recorded == 1
    assert task_row(conn, other)["status"] == "completed"
    assert schedule_row(conn, sent)["error_count"] == 0  # held by its host: no budget spent
    assert schedule_row(conn, sent)["lease_owner"] is None


def test_upgrading_to_the_one_statement_cycle_keeps_leases_and_tasks(server_url,
                                                                     tmp_path) -> None:
    """A task claimed by a worker of before the upgrade is recorded by one after it; the
    other tasks are claimed by the new function."""
    with database_before(server_url, "20261201001900", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            leased = str(create_task(conn, poll_url="https://api.example.com/1")["task_id"])
            conn.execute("select * from taskman.claim_due_tasks('old', 10, 60)")
            due = str(create_task(conn, poll_url="https://api.example.com/2")["task_id"])
        assert [m.version for m in migrate(url)][:1] == ["20261201001900"]  # then later ones
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            claimed = [(str(r["task_id"]), r["held"]) for r in conn.execute(
                "select task_id, held from taskman.claim_admitted_tasks('new', 10, 60)")]
            assert claimed == [(due, False)]
            outcomes = [{"task_id": leased, "worker_id": "old", "ok": True,
                         "status": "completed", "http_status": 200},
                        {"task_id": due, "worker_id": "new", "ok": True,
                         "status": "in_progress", "http_status": 200}]
            assert conn.execute("select taskman.record_polls('old', %s) as n",
                                (json.dumps(outcomes),)).fetchone()["n"] == 2
            assert task_row(conn, leased)["status"] == "completed"
            assert task_row(conn, due)["status"] == "in_progress"


def test_upgrading_to_lookups_by_key_keeps_leases_and_what_hosts_hold_back(
        server_url, tmp_path) -> None:
    """After the upgrade the claim admits tasks created before it as before, leaves a task
    leased before it alone, and reads by key."""
    down, up = "https://down.example.com:443", "https://up.example.com:443"
    with database_before(server_url, "20261202000200", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            leased = str(create_task(conn, poll_url=f"{up}/jobs/0")["task_id"])
            conn.execute("select * from taskman.claim_admitted_tasks('old', 10, 60, 60, 60)")
            conn.execute("select taskman.set_host_limits(%s)", (json.dumps({down: 0.01}),))
            down_ids = {str(create_task(conn, poll_url=f"{down}/jobs/{i}")["task_id"])
                        for i in range(3)}
            other = str(create_task(conn, poll_url=f"{up}/jobs/1")["task_id"])
        assert [m.version for m in migrate(url)][:2] == ["20261202000200", "20261202000300"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            claimed = {str(r["task_id"]): r["held"] for r in conn.execute(
                "select task_id, held from taskman.claim_admitted_tasks('new', 100, 60, 60, 60)")}
            assert set(claimed) == down_ids | {other}  # not the one leased before
            assert sorted(claimed[t] for t in down_ids) == [False, True, True]
            assert not claimed[other]
            assert schedule_row(conn, leased)["lease_owner"] == "old"
            settings = conn.execute(
                "select proconfig from pg_proc where proname in ('claim_due_tasks',"
                " 'claim_admitted_tasks', 'record_poll_results', 'record_polls')"
                " and pronamespace = 'taskman'::regnamespace").fetchall()
            assert len(settings) == 4
            assert all("enable_seqscan=off" in r["proconfig"] for r in settings)


def test_upgrading_to_the_cheaper_held_back_holds_back_the_same_tasks(server_url,
                                                                      tmp_path) -> None:
    down, up = "https://down.example.com:443", "https://up.example.com:443"
    with database_before(server_url, "20261202000600", tmp_path) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("select taskman.set_host_limits(%s)", (json.dumps({down: 0.01}),))
            down_ids = {str(create_task(conn, poll_url=f"{down}/jobs/{i}")["task_id"])
                        for i in range(3)}
            up_ids = {str(create_task(conn, poll_url=f"{up}/jobs/{i}")["task_id"])
                      for i in range(2)}
        assert [m.version for m in migrate(url)][:1] == ["20261202000600"]
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            claimed = {str(r["task_id"]): r["held"] for r in conn.execute(
                "select task_id, held from taskman.claim_admitted_tasks('new', 100, 60, 60, 60)")}
            assert set(claimed) == down_ids | up_ids
            assert sorted(claimed[t] for t in down_ids) == [False, True, True]
            assert not any(claimed[t] for t in up_ids)
            # Held back: due again, not leased; a batch of unrestricted hosts only holds none.
            released = conn.execute("select count(*) as n from taskman_private.task_schedule"
                                    " where lease_owner is null and next_poll_at is not null"
                                    ).fetchone()["n"]
            assert released == 2
            more = {str(create_task(conn, poll_url=f"{up}/more/{i}")["task_id"])
                    for i in range(3)}
            again = {str(r["task_id"]): r["held"] for r in conn.execute(
                "select task_id, held from taskman.claim_admitted_tasks('new', 100, 60, 60, 60)")}
            assert {t: h for t, h in again.items() if t in more} == dict.fromkeys(more, False)
