"""Prometheus metrics of the edge: requests by route and status, latency, tasks by status,
remote hosts.

Host series name every user's remote hosts, so they are exported only behind
``TASKMAN_METRICS_TOKEN``: an edge without the token serves the rest.

Each app has its own registry, so several apps in one process (tests) do not clash.
Task counts are computed when Prometheus scrapes, not kept up to date in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import db, store
from worker.domain import STATUSES
from worker.edge.auth import SERVICE

log = logging.getLogger(__name__)

class TaskStatusCollector(Collector):
    """``taskman_tasks{status}`` and ``taskman_database_up``, read at scrape time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("taskman_database_up", "1 if the edge could query the database.")
        tasks = GaugeMetricFamily("taskman_tasks", "Tasks by status.", labels=["status"])
        try:
            with self._pool.connection(timeout=5) as conn, db.api_session(
                conn, SERVICE.role, SERVICE.claims
            ):
                counts = store.tasks_by_status(conn)
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: cannot count tasks: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for status in STATUSES:
            tasks.add_metric([status], counts.get(status, 0))
        yield tasks


class HostCollector(Collector):
    """Per-host series from the shared host table, read at scrape time: circuit state,
    consecutive and total failures, throttled requests, rate limit, tasks waiting."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        try:
            with self._pool.connection(timeout=5) as conn, db.api_session(
                conn, SERVICE.role, SERVICE.claims
            ):
                hosts = store.host_metrics(conn)
        except Exception as exc:  # taskman_database_up already says the database is down
            log.warning("metrics: cannot read hosts: %s", exc)
            return
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "open": GaugeMetricFamily("taskman_host_circuit_open",
                                      "1 while the host's circuit is open.", labels=["host"]),
            "paused": GaugeMetricFamily("taskman_host_paused",
                                        "1 while the host is paused by a Retry-After.",
                                        labels=["host"]),
            "consecutive_failures": GaugeMetricFamily(
                "taskman_host_consecutive_failures",
                "Transport errors, 5xx and 429 answers from the host since its last success.",
                labels=["host"]),
            "failures_total": CounterMetricFamily(
                "taskman_host_failures", "Transport errors, 5xx and 429 answers from the host.",
                labels=["host"]),
            "throttled_total": CounterMetricFamily(
                "taskman_host_throttled",
                "Requests held back by the host's circuit, pause or rate limit.",
                labels=["host"]),
            "tasks_waiting": GaugeMetricFamily("taskman_host_tasks_waiting",
                                               "Live tasks polled on the host.", labels=["host"]),
            "rate_limit": GaugeMetricFamily(
                "taskman_host_rate_limit", "The host's rate limit in requests per second.",
                labels=["host"]),
        }
        for host in hosts:
            for column, family in families.items():
                value = host[column]
                if value is not None:
                    family.add_metric([host["host"]], float(value))
        yield from families.values()


class EdgeMetrics:
    """The registry of one app and the instruments the middleware updates; the per-host
    series only if `host_series` (the scrape needs a token)."""

    def __init__(self, pool: ConnectionPool, *, host_series: bool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "taskman_edge_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskman_edge_request_duration_seconds",
            "Time to answer (for /events: the stream's lifetime), by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(TaskStatusCollector(pool))
        if host_series:
            self.registry.register(HostCollector(pool))


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by route template (not raw path)."""

    def __init__(self, app: ASGIApp, metrics: EdgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
