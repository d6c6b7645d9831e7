"""Completion callbacks the network policy refused: never silent.

A refused callback is given up at once (retrying would not change the policy). Each
refusal logs a warning with the task id, the host and the reason, and counts in
``taskman_worker_callbacks_refused_total{reason}``; the task's history has the
``notification_given_up`` event (reason ``blocked_by_network_policy``), which the
dashboard shows on the task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from worker.remote.netguard import BlockedURL

log = logging.getLogger(__name__)


def refusal_counter(registry: CollectorRegistry) -> Counter:
    """``taskman_worker_callbacks_refused_total{reason}`` in `registry`."""
    return Counter(
        "taskman_worker_callbacks_refused",
        "Completion callbacks refused by the network policy, by reason: "
        "non_public_address, scheme, credentials, no_host, invalid_url.",
        ["reason"],
        registry=registry,
    )


class RefusedCallbacks:
    """Reports refused callbacks: a warning each, and `counter` by reason (the worker's
    metrics; a counter of its own if none is given)."""

    def __init__(self, counter: Counter | None = None) -> None:
        self.counter = counter if counter is not None else refusal_counter(CollectorRegistry())

    def report(self, payload: Mapping[str, Any], refusal: BlockedURL) -> None:
        """Log and count one refused callback of the task whose JSON is `payload`."""
        task_id = str(payload.get("task_id"))
        log.warning(
            "completion callback of task %s refused by the network policy: host %s, %s: %s",
            task_id, _host(payload.get("callback_url")), refusal.reason, refusal.detail,
            extra={"task_id": task_id},
        )
        self.counter.labels(refusal.reason).inc()


def _host(url: object) -> str:
    try:
        return URL(str(url)).host or "none"
    except ValueError:
        return "unreadable"
