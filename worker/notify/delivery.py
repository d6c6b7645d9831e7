"""The outcome of one delivery attempt, whatever the channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["delivered", "failed", "given_up"]


@dataclass(frozen=True)
class Delivery:
    """What happened when Taskman tried to deliver one notification.

    ``reason`` is a short code owners may see in task_events (``http_status``,
    ``timeout``, ``connection_error``, ``blocked_by_network_policy``, ...);
    ``error`` is the raw text, kept service-only in the outbox row.
    """

    outcome: Outcome
    reason: str | None = None
    http_status: int | None = None
    latency_ms: float | None = None
    retry_after_seconds: float | None = None
    error: str | None = None
