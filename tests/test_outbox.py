"""The outbox: Slack alerts and signed callbacks reach local receivers, exactly once per
successful attempt, with retries, digests and every attempt in task_events."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.factories import USER_A, complete_with_unbounded_result, create_task, events
from tests.remote_api import RemoteAPI, start_receiver
from worker.config import Settings
from worker.notify import OutboxDispatcher
from worker.notify.completion_callbacks import (
    CallbackSender,
    callback_client,
    verify_signature,
)
from worker.notify.delivery import Delivery
from worker.notify.outbox import DispatchSummary

SECRET = "callback-secret-for-tests"


@pytest.fixture
def slack() -> Iterator[RemoteAPI]:
    receiver = start_receiver(answer="ok")
    yield receiver
    receiver.stop()


@pytest.fixture
def hook() -> Iterator[RemoteAPI]:
    receiver = start_receiver(answer={"received": True})
    yield receiver
    receiver.stop()


def make_settings(slack: RemoteAPI | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "TASKMAN_ALLOW_PRIVATE_NETWORKS": True,  # the receivers listen on 127.0.0.1
        "TASKMAN_CALLBACK_SECRET": SECRET,
        "TASKMAN_CALLBACK_TIMEOUT": 5,
        "TASKMAN_OUTBOX_RETRY_BASE": 60,
    }
    if slack is not None:
        values["SLACK_WEBHOOK_URL"] = f"{slack.url()}/services/T000/B000/XXXX"
    return Settings(_env_file=None, **{**values, **overrides})


def dispatch(database_url: str, settings: Settings, worker_id: str = "worker-1") -> DispatchSummary:
    """One round of the dispatcher, as the worker runs it."""

    async def one_round() -> DispatchSummary:
        async with (
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
            callback_client(settings) as http,
        ):
            return await OutboxDispatcher(settings, worker_id, http).run_once(conn)

    return asyncio.run(one_round())


def end_task(conn: psycopg.Connection, task_id: str, status: str) -> None:
    conn.execute("select taskman.update_task(%s, %s)", (task_id, status))


def make_due(conn: psycopg.Connection) -> None:
    """Skip the backoff wait: every pending delivery is due now."""
    conn.execute("update taskman_private.outbox set next_attempt_at = now()")


def delivery_events(conn: psycopg.Connection, task_id: str) -> list[dict[str, Any]]:
    kinds = ("alert_sent", "notification_delivered", "notification_failed", "notification_given_up")
    return [e for e in events(conn, task_id) if e["event_type"] in kinds]


def test_failed_task_sends_exactly_one_slack_alert(conn, database_url, slack) -> None:
    task = create_task(conn, task_type="report", external_id="job-42")
    end_task(conn, task["task_id"], "failed")

    assert dispatch(database_url, make_settings(slack)).delivered == 1
    assert dispatch(database_url, make_settings(slack)).claimed == 0

    [message] = slack.hits()
    text = message.json()["text"]
    assert task["task_id"] in text and "job-42" in text and "remote_failed" in text
    assert "api.example.com" not in text  # no poll URL (it may hold secrets)
    [event] = delivery_events(conn, task["task_id"])
    assert event["event_type"] == "alert_sent"
    assert event["detail"] == {"channel": "slack", "attempt": 1, "http_status": 200,
                               "latency_ms": event["detail"]["latency_ms"]}


def test_task_past_its_deadline_sends_a_timeout_alert(conn, database_url, slack) -> None:
    task = create_task(conn)
    conn.execute("update taskman.tasks set deadline_at = now() - interval '1 second' "
                 "where task_id = %s", (task["task_id"],))
    conn.execute("select taskman.expire_overdue_tasks()")

    dispatch(database_url, make_settings(slack))

    [message] = slack.hits()
    assert "timeout" in message.json()["text"]
    assert "did not finish before its deadline" in message.json()["text"]


def test_completed_and_cancelled_tasks_send_no_alert(conn, database_url, slack) -> None:
    end_task(conn, create_task(conn)["task_id"], "completed")
    end_task(conn, create_task(conn)["task_id"], "cancelled")

    assert dispatch(database_url, make_settings(slack)).claimed == 0
    assert slack.hits() == []


def test_fifty_failures_at_once_become_one_digest(conn, database_url, slack) -> None:
    ids = [create_task(conn, task_type="batch")["task_id"] for _ in range(50)]
    conn.execute("select taskman.update_task(t, 'failed') from unnest(%s::uuid[]) t", (ids,))

    summary = dispatch(database_url, make_settings(slack))

    assert summary.claimed == 50 and summary.delivered == 50
    [message] = slack.hits()
    text = message.json()["text"]
    assert "50 tasks failed (remote_failed: 50)" in text
    assert "and 30 more" in text
    details = [delivery_events(conn, i)[0]["detail"] for i in ids]
    assert all(d["digest_size"] == 50 for d in details)


def test_slack_down_then_up_delivers_once_and_records_each_attempt(
    conn, database_url, slack
) -> None:
    task = create_task(conn)
    end_task(conn, task["task_id"], "failed")
    slack.status = 503

    assert dispatch(database_url, make_settings(slack)).failed == 1
    slack.status = 200
    assert dispatch(database_url, make_settings(slack)).claimed == 0  # backing off
    make_due(conn)
    assert dispatch(database_url, make_settings(slack)).delivered == 1
    make_due(conn)
    assert dispatch(database_url, make_settings(slack)).claimed == 0

    assert len(slack.delivered()) == 1
    assert [r.status for r in slack.hits()] == [503, 200]
    failed, sent = delivery_events(conn, task["task_id"])
    assert failed["event_type"] == "notification_failed"
    assert failed["detail"]["attempt"] == 1 and failed["detail"]["reason"] == "slack_error"
    assert failed["detail"]["http_status"] == 503 and "next_attempt_at" in failed["detail"]
    assert sent["event_type"] == "alert_sent" and sent["detail"]["attempt"] == 2


def test_callback_receiver_down_then_up_gets_the_callback_once(conn, database_url, hook) -> None:
    task = create_task(conn, callback_url=f"{hook.url()}/done")
    end_task(conn, task["task_id"], "completed")
    hook.stop()

    summary = dispatch(database_url, make_settings())
    assert summary.failed == 1
    hook.start()
    make_due(conn)
    assert dispatch(database_url, make_settings()).delivered == 1
    make_due(conn)
    assert dispatch(database_url, make_settings()).claimed == 0

    [callback] = hook.hits()
    assert callback.path == "/done"
    assert callback.json()["task_id"] == task["task_id"]
    assert callback.json()["status"] == "completed"
    failed, delivered = delivery_events(conn, task["task_id"])
    assert failed["event_type"] == "notification_failed"
    assert failed["detail"]["reason"] == "connection_error"
    assert delivered["event_type"] == "notification_delivered"
    assert delivered["detail"]["attempt"] == 2 and delivered["detail"]["http_status"] == 200


def test_callback_signature_verifies_with_the_documented_recipe(conn, database_url, hook) -> None:
    task = create_task(conn, callback_url=hook.url(), metadata={"order": 7})
    end_task(conn, task["task_id"], "completed")

    dispatch(database_url, make_settings())

    [callback] = hook.hits()
    timestamp = callback.headers["X-Taskman-Timestamp"]
    signature = callback.headers["X-Taskman-Signature"]
    # The recipe of docs/callbacks.md, step by step.
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + callback.body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, f"sha256={expected}")
    assert verify_signature(SECRET, timestamp, callback.body, signature)
    assert not verify_signature(SECRET, timestamp, callback.body + b" ", signature)
    assert not verify_signature("wrong-secret", timestamp, callback.body, signature)
    assert not verify_signature(SECRET, str(int(timestamp) - 3600), callback.body, signature)
    body = json.loads(callback.body)
    assert body["metadata"] == {"order": 7}
    assert "poll_headers" not in body and "lease_owner" not in body
    assert callback.headers["X-Taskman-Event"] == "task.completed"
    assert callback.headers["X-Taskman-Delivery"].isdigit()


def test_failed_callbacks_back_off_exponentially(conn, database_url, hook) -> None:
    task = create_task(conn, callback_url=hook.url())
    end_task(conn, task["task_id"], "failed")
    hook.status = 500
    settings = make_settings(TASKMAN_OUTBOX_RETRY_BASE=100)

    waits = []
    for _ in range(3):
        make_due(conn)
        dispatch(database_url, settings)
        waits.append(conn.execute(
            "select next_attempt_at - now() as wait from taskman_private.outbox "
            "where channel = 'callback'").fetchone()["wait"])

    # base * 2^(attempt-1), with 50-100% jitter
    for attempt, wait in enumerate(waits, start=1):
        full = timedelta(seconds=100 * 2 ** (attempt - 1))
        assert full / 2 - timedelta(seconds=2) <= wait <= full


def test_receiver_retry_after_is_honoured(conn, database_url, hook) -> None:
    task = create_task(conn, callback_url=hook.url())
    end_task(conn, task["task_id"], "completed")
    hook.status = 429
    hook.headers = {"Retry-After": "900"}

    dispatch(database_url, make_settings())

    wait = conn.execute("select next_attempt_at - now() as wait from taskman_private.outbox"
                        ).fetchone()["wait"]
    assert timedelta(seconds=890) <= wait <= timedelta(seconds=900)


def test_delivery_gives_up_after_max_attempts(conn, database_url, hook) -> None:
    task = create_task(conn, callback_url=hook.url())
    end_task(conn, task["task_id"], "completed")
    hook.status = 500
    settings = make_settings(TASKMAN_OUTBOX_MAX_ATTEMPTS=2)

    assert dispatch(database_url, settings).failed == 1
    make_due(conn)
    assert dispatch(database_url, settings).given_up == 1
    make_due(conn)
    assert dispatch(database_url, settings).claimed == 0

    assert len(hook.hits()) == 2
    kinds = [e["event_type"] for e in delivery_events(conn, task["task_id"])]
    assert kinds == ["notification_failed", "notification_given_up"]
    row = conn.execute("select * from taskman_private.outbox").fetchone()
    assert row["given_up_at"] is not None and row["last_error"].startswith("HTTP 500")


def test_alerts_without_slack_configured_are_given_up_with_a_reason(conn, database_url) -> None:
    task = create_task(conn)
    end_task(conn, task["task_id"], "failed")

    assert dispatch(database_url, make_settings()).given_up == 1

    [event] = delivery_events(conn, task["task_id"])
    assert event["event_type"] == "notification_given_up"
    assert event["detail"]["reason"] == "slack_not_configured"


def test_slack_bot_token_posts_to_the_configured_channel(conn, database_url) -> None:
    api = start_receiver(answer={"ok": True, "channel": "C1", "ts": "1.0"})
    try:
        task = create_task(conn)
        end_task(conn, task["task_id"], "failed")
        settings = make_settings(SLACK_BOT_TOKEN="xoxb-test", SLACK_CHANNEL="#alerts",
                                 SLACK_API_URL=f"{api.url()}/api/")

        assert dispatch(database_url, settings).delivered == 1
    finally:
        api.stop()
    [call] = api.hits()
    assert call.path == "/api/chat.postMessage"
    assert call.headers["Authorization"] == "Bearer xoxb-test"
    assert task["task_id"] in call.body.decode()


def test_slack_api_error_counts_as_a_failed_attempt(conn, database_url) -> None:
    api = start_receiver(answer={"ok": False, "error": "channel_not_found"})
    try:
        task = create_task(conn)
        end_task(conn, task["task_id"], "failed")
        settings = make_settings(SLACK_BOT_TOKEN="xoxb-test", SLACK_CHANNEL="#gone",
                                 SLACK_API_URL=f"{api.url()}/api/")
        assert dispatch(database_url, settings).failed == 1
    finally:
        api.stop()
    last_error = conn.execute("select last_error from taskman_private.outbox").fetchone()
    assert "channel_not_found" in last_error["last_error"]


def test_callback_to_a_private_address_is_refused_by_the_network_policy(
    conn, database_url, hook
) -> None:
    task = create_task(conn, callback_url=hook.url())
    end_task(conn, task["task_id"], "completed")

    summary = dispatch(database_url, make_settings(TASKMAN_ALLOW_PRIVATE_NETWORKS=False))

    assert summary.given_up == 1
    assert hook.hits() == []
    [event] = delivery_events(conn, task["task_id"])
    assert event["detail"]["reason"] == "blocked_by_network_policy"


def test_a_callback_name_resolving_to_a_private_address_is_refused_on_the_connection(
    conn, database_url, hook
) -> None:
    task = create_task(conn, callback_url=hook.url(host="localhost"))
    end_task(conn, task["task_id"], "completed")

    summary = dispatch(database_url, make_settings(TASKMAN_ALLOW_PRIVATE_NETWORKS=False))

    assert summary.given_up == 1
    assert hook.hits() == []
    [event] = delivery_events(conn, task["task_id"])
    assert event["detail"]["reason"] == "blocked_by_network_policy"
    row = conn.execute("select last_error from taskman_private.outbox").fetchone()
    assert "localhost resolves to" in row["last_error"]  # the address, for the service


@pytest.mark.parametrize("host", ["a..example", "x" * 64 + ".example"])
def test_a_callback_host_name_no_resolver_can_encode_is_given_up(host) -> None:
    # The database refuses such URLs at creation; rows stored before that check remain.
    async def deliver() -> Delivery:
        async with callback_client(make_settings(TASKMAN_ALLOW_PRIVATE_NETWORKS=False)) as http:
            return await CallbackSender(http, SECRET).deliver(
                1, {"callback_url": f"http://{host}/hook", "status": "completed"})

    delivery = asyncio.run(deliver())
    assert (delivery.outcome, delivery.reason) == ("given_up", "invalid_url")


def test_concurrent_dispatchers_deliver_each_callback_once(conn, database_url, hook) -> None:
    ids = [create_task(conn, callback_url=f"{hook.url()}/{i}")["task_id"] for i in range(30)]
    conn.execute("select taskman.update_task(t, 'completed') from unnest(%s::uuid[]) t", (ids,))
    settings = make_settings(TASKMAN_OUTBOX_BATCH_SIZE=10)

    async def race() -> list[DispatchSummary]:
        async def worker(name: str) -> list[DispatchSummary]:
            async with (
                await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c,
                callback_client(settings) as http,
            ):
                dispatcher = OutboxDispatcher(settings, name, http)
                return [await dispatcher.run_once(c) for _ in range(4)]

        rounds = await asyncio.gather(worker("a"), worker("b"), worker("c"))
        return [summary for r in rounds for summary in r]

    summaries = asyncio.run(race())

    assert sum(s.delivered for s in summaries) == 30
    assert sorted(r.path for r in hook.hits()) == sorted(f"/{i}" for i in range(30))


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_only_the_service_may_claim_record_or_give_back_deliveries(api, role) -> None:
    sub = USER_A if role == "authenticated" else None
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api.rpc(role, "claim_outbox", sub=sub, worker_id="intruder")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api.rpc(role, "record_outbox_results", sub=sub, results=Jsonb([]))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api.rpc(role, "release_outbox", sub=sub, worker_id="intruder")


def test_giving_back_releases_only_the_workers_own_unrecorded_claims(conn) -> None:
    tasks = [create_task(conn, poll_url=None, callback_url=f"https://hooks.example/{i}")
             for i in range(3)]
    for task in tasks:
        end_task(conn, task["task_id"], "completed")
    mine = conn.execute("select outbox_id from taskman.claim_outbox('me', 2, 600)").fetchall()
    [theirs] = conn.execute("select outbox_id from taskman.claim_outbox('them', 5, 600)")
    conn.execute("select taskman.record_outbox_results(%s)", (Jsonb([
        {"outbox_id": mine[0]["outbox_id"], "worker_id": "me", "outcome": "delivered"}]),))

    assert conn.execute("select taskman.release_outbox('me', 'callback') as n"
                        ).fetchone()["n"] == 1
    rows = {r["outbox_id"]: r for r in conn.execute(
        "select outbox_id, lease_owner, attempts, delivered_at is not null as delivered,"
        " next_attempt_at <= now() as due from taskman_private.outbox")}
    assert rows[mine[1]["outbox_id"]] == {**rows[mine[1]["outbox_id"]], "lease_owner": None,
                                          "attempts": 0, "due": True}
    assert rows[mine[0]["outbox_id"]]["delivered"]
    assert rows[theirs["outbox_id"]]["lease_owner"] == "them"
    assert not rows[theirs["outbox_id"]]["due"]
    for bad in ("select taskman.release_outbox('')",
                "select taskman.release_outbox('me', 'email')"):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(bad)


def test_an_outcome_whose_lease_moved_on_while_it_was_written_is_ignored(
        conn, database_url) -> None:
    task = create_task(conn, poll_url=None, callback_url="https://hooks.example/late")
    end_task(conn, task["task_id"], "completed")
    [row] = conn.execute("select outbox_id from taskman.claim_outbox('slow', 1, 600)")
    outcome = Jsonb([{"outbox_id": row["outbox_id"], "worker_id": "slow",
                      "outcome": "delivered"}])
    with psycopg.connect(database_url, autocommit=True) as other, \
            psycopg.connect(database_url, autocommit=True) as late:
        other.execute("begin")  # the lease ran out and another worker claims the row ...
        other.execute("update taskman_private.outbox set lease_owner = 'fast'"
                      " where outbox_id = %s", (row["outbox_id"],))
        late.execute("set statement_timeout = '10s'")
        recording = late.cursor()
        done = asyncio.run(_record_while(recording, outcome, other))

    assert done == []  # ... while the first worker's outcome waits for the row: ignored
    state = conn.execute("select lease_owner, attempts, delivered_at from taskman_private.outbox"
                         " where outbox_id = %s", (row["outbox_id"],)).fetchone()
    assert state == {"lease_owner": "fast", "attempts": 0, "delivered_at": None}
    assert delivery_events(conn, task["task_id"]) == []


async def _record_while(cursor: psycopg.Cursor, outcome: Jsonb,
                        holder: psycopg.Connection) -> list[Any]:
    """Record `outcome` in a thread while `holder`'s open transaction holds the row; commit
    it once the record waits for the lock."""
    recorded = asyncio.create_task(asyncio.to_thread(
        lambda: cursor.execute("select outcome from taskman.record_outbox_results(%s)",
                               (outcome,)).fetchall()))
    await asyncio.sleep(0.5)
    assert not recorded.done()  # it waits for the row
    holder.execute("commit")
    return await recorded


@pytest.mark.parametrize("poison", ["[" * 5000 + "]" * 5000,  # deeper than Python reads
                                    "1" + "0" * 5000])  # more digits than Python's int allows
def test_a_result_python_cannot_read_fails_alone_then_is_given_up(conn, database_url, hook,
                                                                  poison) -> None:
    bad = create_task(conn, callback_url=f"{hook.url()}/poison")["task_id"]
    complete_with_unbounded_result(conn, bad, poison)
    good = create_task(conn, callback_url=f"{hook.url()}/normal")["task_id"]
    end_task(conn, good, "completed")
    settings = make_settings(TASKMAN_OUTBOX_MAX_ATTEMPTS=2)

    first = dispatch(database_url, settings)
    assert (first.claimed, first.delivered, first.failed) == (2, 1, 1)
    assert [r.path for r in hook.hits()] == ["/normal"]  # the row behind it went out
    make_due(conn)
    assert dispatch(database_url, settings).given_up == 1

    failed, given_up = delivery_events(conn, bad)
    assert (failed["event_type"], failed["detail"]["reason"]) == (
        "notification_failed", "unreadable_payload")
    assert "next_attempt_at" in failed["detail"]
    assert (given_up["event_type"], given_up["detail"]["attempt"]) == (
        "notification_given_up", 2)
    row = conn.execute("select given_up_at, last_error from taskman_private.outbox"
                       " where task_id = %s",
                       (bad,)).fetchone()
    assert row["given_up_at"] is not None
    assert row["last_error"].startswith("the task's JSON could not be read")
    assert hook.hits()[1:] == []


def test_recording_a_batch_reads_its_outbox_rows_by_key_not_the_whole_outbox(conn) -> None:
    """The read grows with the outbox otherwise: in a backlog it took most of a
    callback's database time."""
    ids = [str(create_task(conn, callback_url=f"https://hooks.example.com/{i}")["task_id"])
           for i in range(300)]
    conn.execute("select taskman.update_task(t, 'completed') from unnest(%s::uuid[]) t", (ids,))
    conn.execute("analyze taskman_private.outbox")
    claimed = conn.execute("select outbox_id from taskman.claim_outbox('w', 100, 60)").fetchall()
    results = [{"outbox_id": r["outbox_id"], "worker_id": "w", "outcome": "delivered"}
               for r in claimed]
    with conn.transaction():
        recorded = conn.execute("select * from taskman.record_outbox_results(%s)",
                                (json.dumps(results),)).fetchall()
        scans = conn.execute("select seq_scan from pg_stat_xact_user_tables"
                             " where relid = 'taskman_private.outbox'::regclass").fetchone()
    assert len(recorded) == 100
    assert scans["seq_scan"] == 0
