"""Notifications: Slack alerts and signed completion callbacks, delivered from the outbox."""

from worker.notify.outbox import OutboxDispatcher

__all__ = ["OutboxDispatcher"]
