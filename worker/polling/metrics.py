"""Prometheus instruments of the worker: polls by outcome, poll, claim and record latency,
refused callbacks.

Each worker has its own registry, so several workers in one process (tests, ``taskman
dev``) do not clash; whoever serves ``/metrics`` collects it beside its own. Task counts
by status are the edge's (worker/edge/metrics.py), read at scrape time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from worker.notify.refusals import refusal_counter

# Polls against remote APIs: milliseconds to the poll timeout.
_POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Round trips to the database.
_DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class WorkerMetrics:
    """The registry of one worker and the instruments its loop updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.polls = Counter(
            "taskman_worker_polls",
            "Polls made, by outcome: completed, cancelled, running, pending, retry (transient "
            "failure), or the error_code of a final failure.",
            ["outcome"],
            registry=self.registry,
        )
        self.poll_latency = Histogram(
            "taskman_worker_poll_duration_seconds",
            "Time from sending a poll to having read its answer, redirects included.",
            buckets=_POLL_BUCKETS,
            registry=self.registry,
        )
        self.claim_latency = Histogram(
            "taskman_worker_claim_duration_seconds",
            "Time of one claim round trip (claim_admitted_tasks).",
            buckets=_DB_BUCKETS,
            registry=self.registry,
        )
        self.callbacks_refused = refusal_counter(self.registry)
        self.record_latency = Histogram(
            "taskman_worker_record_duration_seconds",
            "Time of one record_poll_results round trip (one batch of outcomes).",
            buckets=_DB_BUCKETS,
            registry=self.registry,
        )

    def count_poll(self, outcome: Mapping[str, Any]) -> None:
        """Count one poll outcome (as sent to record_poll_results) and its latency."""
        self.polls.labels(poll_outcome_label(outcome)).inc()
        latency_ms = outcome.get("latency_ms")
        if latency_ms is not None:
            self.poll_latency.observe(latency_ms / 1000)


def poll_outcome_label(outcome: Mapping[str, Any]) -> str:
    """The ``outcome`` label of a poll outcome."""
    status = outcome.get("status")
    if status == "failed":
        return str(outcome["error_code"])
    if not outcome["ok"]:
        return "retry"
    labels = {"completed": "completed", "cancelled": "cancelled", "in_progress": "running"}
    return labels.get(status or "", "pending")
