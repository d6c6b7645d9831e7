"""The worker process: the claim/poll loop, callbacks delivered as they are enqueued, and
Slack alerts, the expiry of undeliverable notifications and retention as periodic jobs
(the alerts' interval is the digest window)."""

from __future__ import annotations

import asyncio
import gc
import signal
from functools import partial

import uvloop

from worker.config import Settings
from worker.notify.completion_callbacks import callback_client
from worker.notify.expiry import EXPIRY_INTERVAL_SECONDS, NotificationExpiry
from worker.notify.outbox import CallbackStream, OutboxDispatcher
from worker.notify.refusals import RefusedCallbacks
from worker.notify.signing import worker_signing
from worker.polling.loop import PeriodicJob, Worker, new_worker_id
from worker.polling.metrics import WorkerMetrics
from worker.polling.retention import RETENTION_INTERVAL_SECONDS, Retention

# Slack alerts go out within about this long of a task failing; the failures of one
# window share one message (a digest). Callbacks do not wait for it.
ALERT_WINDOW_SECONDS = 1.0
# Allocations between generation-0 garbage collections in the worker process (default
# 700). Higher saves little more CPU and lets cyclic garbage (answers of up to
# TASKMAN_MAX_RESPONSE_BYTES among it) pile up: tests/test_worker_memory.py.
GC_THRESHOLD = 10_000


async def run_worker(settings: Settings, conninfo: str, stop: asyncio.Event,
                     metrics: WorkerMetrics | None = None) -> None:
    """Poll tasks and deliver notifications until ``stop`` is set, then shut down gracefully."""
    worker_id = new_worker_id()
    metrics = metrics or WorkerMetrics()
    refusals = RefusedCallbacks(metrics.callbacks_refused)
    async with callback_client(settings) as http, worker_signing(settings, conninfo) as signer:
        alerts = OutboxDispatcher(settings, worker_id, http, refusals, signer)
        jobs = [PeriodicJob("deliver_alerts", ALERT_WINDOW_SECONDS,
                            partial(alerts.run_once, channel="slack"))]
        expiry = NotificationExpiry(settings)
        if expiry.enabled:
            jobs.append(PeriodicJob("give_up_stale_notifications", EXPIRY_INTERVAL_SECONDS,
                                    expiry.run_once))
        retention = Retention(settings)
        if retention.enabled:
            jobs.append(PeriodicJob("retention", RETENTION_INTERVAL_SECONDS, retention.run_once))
        services = [CallbackStream(settings, worker_id, http, refusals, signer)]
        await Worker(settings, conninfo, jobs=jobs, services=services, worker_id=worker_id,
                     metrics=metrics).run(stop)


def serve_worker(settings: Settings, conninfo: str, metrics: WorkerMetrics | None = None) -> None:
    """Run the worker in this process until SIGTERM or SIGINT, then shut it down gracefully."""

    async def until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_worker(settings, conninfo, stop, metrics)

    # Polls allocate many short-lived objects: a generation-0 collection every 700
    # allocations (the default) costs the worker a tenth of its CPU per poll; the
    # objects of startup are frozen out of collections altogether.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    # uvloop: the event loop's own work (sockets, timers, callbacks) in C.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(until_signalled())
