"""Slack alerts for failed tasks, with slack-sdk: an incoming webhook or chat.postMessage.

The outbox hands over every alert it claimed at once, so a burst of failures becomes
one digest message. The text names tasks by id, type and external id with their
error code and neutral error message: never poll URLs, headers, results or raw
remote text.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.error import URLError

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient

from worker.config import Settings
from worker.notify.delivery import Delivery
from worker.remote.backoff import parse_retry_after

# A digest lists this many tasks, then counts the rest.
MAX_LISTED = 20
MAX_FIELD = 200


def _escape(text: Any, limit: int = MAX_FIELD) -> str:
    """Text made inert for Slack mrkdwn (no links, mentions or markup) and bounded."""
    value = str(text)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value.replace("`", "'")


def alert_text(tasks: Sequence[Mapping[str, Any]]) -> str:
    """The message for failed tasks (their public JSON): one line each, under a header
    that counts them by error code when there are several."""
    if len(tasks) == 1:
        header = ":rotating_light: Taskman: a task failed"
    else:
        codes = Counter(str(t.get("error_code") or "unknown") for t in tasks)
        summary = ", ".join(f"{code}: {n}" for code, n in codes.most_common())
        header = f":rotating_light: Taskman: {len(tasks)} tasks failed ({_escape(summary)})"
    lines = [header]
    for task in tasks[:MAX_LISTED]:
        external = f" ({_escape(task['external_id'])})" if task.get("external_id") else ""
        lines.append(
            f"• `{_escape(task.get('task_id'))}` {_escape(task.get('task_type'))}{external}: "
            f"{_escape(task.get('error_code') or 'unknown')}, "
            f"{_escape(task.get('error_message') or 'no message')}"
        )
    if len(tasks) > MAX_LISTED:
        lines.append(f"…and {len(tasks) - MAX_LISTED} more.")
    return "\n".join(lines)


def is_host_alert(payload: Mapping[str, Any] | None) -> bool:
    """Whether an outbox payload is a host's circuit opening or closing (not a task)."""
    return payload is not None and payload.get("kind") == "host_circuit"


def host_alert_text(alert: Mapping[str, Any]) -> str:
    """The message for a host's circuit opening or closing: the host, since when, the
    tasks waiting on it and the last error."""
    host = _escape(alert.get("host"))
    since = _escape(_when(alert.get("since")))
    waiting = int(alert.get("tasks_waiting") or 0)
    owner = alert.get("owner")
    whose = f" for the tasks of owner `{_escape(owner)}`" if owner else ""
    if alert.get("event") == "opened":
        return (f":no_entry: Taskman: host `{host}` is failing{whose}; its circuit is open "
                f"since {since}. {waiting} tasks wait for it (probing with backoff). "
                f"Last error: {_escape(alert.get('last_error') or 'unknown')}.")
    return (f":white_check_mark: Taskman: host `{host}` answers again{whose}; its circuit is "
            f"closed (open since {since}). {waiting} tasks resume.")


def _when(iso: object) -> str:
    """An ISO timestamp as ``2026-12-01 17:30:05 UTC``."""
    try:
        return datetime.fromisoformat(str(iso)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return "an unknown time"


class SlackAlerter:
    """Sends alert text to one Slack destination. Blocking: call it from a thread.

    slack-sdk's own retries are off: the outbox retries, and records every attempt.
    """

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        bot_token: str | None = None,
        channel: str | None = None,
        api_url: str = "https://slack.com/api/",
        timeout_seconds: float = 10.0,
    ) -> None:
        if not webhook_url and not (bot_token and channel):
            raise ValueError("Slack needs a webhook URL, or a bot token and a channel")
        timeout = max(1, round(timeout_seconds))
        self._webhook = (
            WebhookClient(webhook_url, timeout=timeout, retry_handlers=[]) if webhook_url else None
        )
        self._web = (
            None
            if webhook_url
            else WebClient(token=bot_token, base_url=api_url, timeout=timeout, retry_handlers=[])
        )
        self._channel = channel

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackAlerter | None:
        """The configured alerter (the webhook wins over a bot token), or None."""
        webhook = settings.slack_webhook_url
        token = settings.slack_bot_token
        if not webhook and not (token and settings.slack_channel):
            return None
        return cls(
            webhook_url=webhook.get_secret_value() if webhook else None,
            bot_token=token.get_secret_value() if token else None,
            channel=settings.slack_channel,
            api_url=settings.slack_api_url,
            timeout_seconds=settings.callback_timeout_seconds,
        )

    def send(self, text: str) -> Delivery:
        """Post ``text``; the Delivery says whether Slack accepted it."""
        started = time.perf_counter()
        try:
            if self._webhook is not None:
                hooked = self._webhook.send(text=text)
                status, headers, error = hooked.status_code, hooked.headers, hooked.body
            else:
                assert self._web is not None and self._channel is not None  # see __init__
                posted = self._web.chat_postMessage(channel=self._channel, text=text)
                status, headers, error = posted.status_code, posted.headers, ""
        except SlackApiError as exc:  # chat.postMessage answered ok: false
            response = exc.response
            status, headers, error = response.status_code, response.headers, response.get("error")
            if 200 <= status < 300:
                status = 400  # an error in a 200 answer is still a refusal
        except (URLError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError) or isinstance(
                getattr(exc, "reason", None), TimeoutError
            )
            reason = "timeout" if timed_out else "connection_error"
            return Delivery("failed", reason=reason, error=f"Slack: {exc}")
        latency_ms = (time.perf_counter() - started) * 1000
        if 200 <= status < 300:
            return Delivery("delivered", http_status=status, latency_ms=latency_ms)
        return Delivery(
            "failed",
            reason="slack_error",
            http_status=status,
            latency_ms=latency_ms,
            retry_after_seconds=parse_retry_after(
                _header(headers, "retry-after"), datetime.now(UTC)
            ),
            error=f"Slack answered HTTP {status}: {str(error)[:200]}",
        )


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value[0] if isinstance(value, list) else value
    return None
