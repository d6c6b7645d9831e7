"""The edge application: wiring of the pool, auth, routes, events, metrics and limits."""

from __future__ import annotations

import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import db
from worker.config import Settings
from worker.edge import dashboard, routes
from worker.edge.auth import Authenticator
from worker.edge.errors import error_body, install_error_handlers
from worker.edge.metrics import EdgeMetrics, MetricsMiddleware
from worker.edge.sse import TaskEventHub
from worker.remote.netguard import NetworkPolicy

log = logging.getLogger(__name__)

POOL_TIMEOUT_SECONDS = 10.0


def create_app(
    settings: Settings, conninfo: str, *, keepalive_seconds: float = 15.0
) -> FastAPI:
    """The edge app for the database at ``conninfo``.

    The connection pool and the shared LISTEN connection open when the app starts
    and close when it stops; a database that is down at start makes ``/healthz``
    answer 503 until it is back, rather than preventing the start. Behind a
    transaction pooler (``TASKMAN_DATABASE_POOL_MODE``) nothing is prepared, and
    ``/events`` listens on ``TASKMAN_LISTEN_DATABASE_URL`` or else polls for changes.
    """
    connections = db.Connections.resolve(
        conninfo, settings.database_pool_mode, settings.listen_database_url)
    pool = ConnectionPool(
        conninfo,
        min_size=1,
        max_size=settings.edge_pool_size,
        timeout=POOL_TIMEOUT_SECONDS,
        kwargs={"autocommit": True, "row_factory": dict_row, "application_name": "taskman-edge",
                **connections.connection_kwargs},
        open=False,
    )
    hub = TaskEventHub(connections.listen_conninfo, conninfo=conninfo,
                       connection_kwargs=connections.connection_kwargs,
                       poll_interval=settings.change_check_interval,
                       max_streams=stream_capacity(settings.events_max_streams),
                       max_streams_per_owner=settings.events_max_streams_per_user)
    if hub.polling:  # a warning, so that it shows with uvicorn's default logging
        log.warning("DATABASE_URL is a transaction pooler, where LISTEN does not work: /events "
                 "checks for task changes every %.2gs. For changes within milliseconds, set "
                 "TASKMAN_LISTEN_DATABASE_URL to a direct or session pooler URL.",
                 settings.change_check_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            pool.close()

    app = FastAPI(
        title="Taskman",
        version="0.1.0",
        description="Track long-running asynchronous jobs. Authenticate with "
        "`Authorization: Bearer <API key or Supabase JWT>`.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.pool = pool
    app.state.read_only = db.ReadOnlyRenewal()
    app.state.hub = hub
    app.state.keepalive_seconds = keepalive_seconds
    app.state.authenticator = Authenticator(
        settings.api_keys,
        settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
        settings.jwt_audience,
        supabase_url=settings.supabase_url,
        jwks_timeout=settings.jwks_timeout_seconds,
        jwks_refresh_interval=settings.jwks_refresh_interval_seconds,
        jwks_max_age=settings.jwks_max_age_seconds,
    )
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    app.state.metrics_token = token.encode() if token else None
    app.state.metrics = EdgeMetrics(pool, host_series=app.state.metrics_token is not None)
    # New tasks' URLs are checked against the policy the worker applies (same settings).
    app.state.network_policy = NetworkPolicy.from_settings(settings)
    install_error_handlers(app)
    app.include_router(routes.router, tags=["tasks"])
    app.include_router(routes.seed_router)
    # The seed's n8n workflows called these under /webhook/: the same routes answer there.
    app.include_router(routes.seed_router, prefix="/webhook", include_in_schema=False)
    app.include_router(routes.public_router, tags=["public"])
    app.include_router(dashboard.router)
    # The last added is the outermost: metrics see every answer, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.edge_max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def stream_capacity(configured: int) -> int:
    """How many /events streams to serve: ``configured``, lowered to half the file
    descriptors the process may open, so that streams never take the sockets and
    database connections every other request needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft // 2:
        return configured
    capacity = max(1, soft // 2)
    log.warning("serving at most %d event streams, not TASKMAN_EVENTS_MAX_STREAMS=%d: the "
                "process may open only %d files", capacity, configured, soft)
    return capacity


class BodyLimitMiddleware:
    """Answers 413 to a request body over ``max_bytes``, declared or streamed.

    The body is read in full (it is small by definition) before the app sees it, so
    no handler ever meets a half-read body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            "payload_too_large", f"The request body is larger than {self.max_bytes} bytes."
        )
        # Connection: close, since the rest of the body is left unread.
        response = JSONResponse(body, status_code=413, headers={"connection": "close"})
        await response(scope, receive, send)
