"""The edge's routes: tasks, the seed's n8n webhooks, third-party callbacks, stats, health.

Every route runs its SQL through ``db.api_session`` as the caller's role with the
caller's claims, so the database's RLS and functions decide exactly as under
PostgREST; the routes only translate HTTP to function calls and back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

import psycopg
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import ConnectionPool
from starlette.types import Receive, Scope, Send

from worker import db, store
from worker.domain import Status, TaskCreate, TaskReport
from worker.edge.auth import ANONYMOUS, Caller, Principal
from worker.edge.errors import ApiError, error_responses, not_found
from worker.edge.incoming_callbacks import plain_report, report_from_profile
from worker.edge.models import (
    CallbackAck,
    CallbackSecret,
    CreatedTask,
    DateTimeParam,
    EventPage,
    Health,
    Host,
    RetriedTask,
    Stats,
    Task,
    TaskPage,
    TaskPatch,
    TaskStatus,
    TaskUpdate,
)
from worker.edge.sse import StreamLimitReached, Subscription, TaskEventHub, event_stream
from worker.remote.url_policy import RefusedURL, check_task_urls, task_urls

T = TypeVar("T")

# The only query parameter that may be repeated (?status=failed&status=cancelled).
_LIST_PARAMETERS = frozenset({"status"})


def _single_valued_query(request: Request) -> None:
    """Refuse a repeated scalar parameter rather than silently keep one of its values."""
    params = request.query_params
    for name in params:
        if name not in _LIST_PARAMETERS and len(params.getlist(name)) > 1:
            raise ApiError(422, "invalid_argument", f"{name}: give it at most once", name)


AUTHED = error_responses(400, 401, 403, 413, 422, 503)
_checked = [Depends(_single_valued_query)]
router = APIRouter(responses=AUTHED, dependencies=_checked)
seed_router = APIRouter(responses=AUTHED, tags=["seed webhooks"], dependencies=_checked)
public_router = APIRouter()

TaskId = Annotated[UUID, Path(description="The task's id.")]


@contextmanager
def _session(request: Request, principal: Principal) -> Iterator[psycopg.Connection[Any]]:
    """One transaction as ``principal``, on a pooled connection. After a write refused
    as read-only the pool's connections are replaced (db.ReadOnlyRenewal), so that writes
    go through again as soon as the database allows them."""
    pool: ConnectionPool = request.app.state.pool
    with pool.connection() as conn:
        try:
            with db.api_session(conn, principal.role, principal.claims):
                yield conn
        except psycopg.errors.ReadOnlySqlTransaction:
            conn.close()
            if request.app.state.read_only.due():
                pool.drain()
            raise


def _call(request: Request, principal: Principal, call: Callable[..., T], *args: Any) -> T:
    """``call(conn, *args)``, a store function, in one transaction as ``principal``."""
    with _session(request, principal) as conn:
        return call(conn, *args)


def _create(request: Request, principal: Principal, body: TaskCreate, response: Response) -> Any:
    try:
        check_task_urls(task_urls(body), request.app.state.network_policy)
    except RefusedURL as exc:
        raise ApiError(422, "invalid_argument", str(exc), exc.field) from None
    task = _call(request, principal, store.create_task, body)
    response.status_code = 200 if task.get("idempotent_replay") else 201
    return task


# --- tasks -------------------------------------------------------------------------------


@router.post(
    "/tasks",
    response_model=CreatedTask,
    status_code=201,
    summary="Create a task",
    responses={200: {"model": CreatedTask, "description": "Idempotent replay: the existing task."}},
)
def create_task(request: Request, caller: Caller, body: TaskCreate, response: Response) -> Any:
    """Register a task to poll (``poll_url``) or to wait for a callback. The answer carries
    the plain ``callback_token`` once; with an ``idempotency_key`` already used by the
    caller, the existing task comes back (200) instead of a new one."""
    return _create(request, caller, body, response)


def _encode_cursor(task: Mapping[str, Any]) -> str:
    raw = f"{task['created_at']}|{task['task_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, task_id = raw.split("|")
        return datetime.fromisoformat(created_at), UUID(task_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(
            422, "invalid_argument", "cursor is not one this API returned", "cursor"
        ) from None


@router.get("/tasks", response_model=TaskPage, summary="List tasks")
def list_tasks(
    request: Request,
    caller: Caller,
    status: Annotated[list[Status] | None, Query(description="Repeat for several.")] = None,
    task_type: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$")] = None,
    created_from: Annotated[
        DateTimeParam | None,
        Query(alias="from", description="created_at at or after (inclusive)."),
    ] = None,
    created_to: Annotated[
        DateTimeParam | None, Query(alias="to", description="created_at before (exclusive).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="From next_cursor.")] = None,
) -> Any:
    """The caller's tasks (all of them for the service), newest first, a page at a time.
    Pagination is by keyset: pass the answer's ``next_cursor`` as ``cursor`` for the next,
    older page; pages stay consistent while new tasks arrive."""
    with _session(request, caller) as conn:
        rows = store.list_tasks(
            conn, limit=limit + 1, statuses=status, task_type=task_type,
            created_from=created_from, created_to=created_to,
            before=_decode_cursor(cursor) if cursor else None,
        )
    tasks = rows[:limit]
    next_cursor = _encode_cursor(tasks[-1]) if len(rows) > limit else None
    return {"tasks": tasks, "next_cursor": next_cursor}


@router.get("/tasks/{task_id}", response_model=Task, summary="Read a task",
            responses=error_responses(404))
def get_task(request: Request, caller: Caller, task_id: TaskId) -> Any:
    task = _call(request, caller, store.get_task, task_id)
    if task is None:
        raise not_found(f"task {task_id}")
    return task


@router.patch("/tasks/{task_id}", response_model=Task, summary="Change a task",
              responses=error_responses(404, 409))
def patch_task(request: Request, caller: Caller, task_id: TaskId, body: TaskPatch) -> Any:
    """Owners may replace ``metadata`` only. The service may also report status, result,
    progress and error message, as ``update_task`` (illegal transitions are 409)."""
    report = body.model_dump(include=set(TaskReport.model_fields), exclude_none=True)
    if report and not caller.is_service:
        raise ApiError(
            403,
            "forbidden",
            "Owners may change metadata only; status and results come from the remote, "
            "or through cancel and retry.",
        )
    if not report and body.metadata is None:
        raise ApiError(422, "invalid_argument", "Nothing to change: send metadata or a report.")
    task = None
    with _session(request, caller) as conn:
        if report:
            task = store.update_task(conn, task_id, body)
        if body.metadata is not None:
            task = store.set_metadata(conn, task_id, body.metadata)
    if task is None:
        raise not_found(f"task {task_id}")
    return task


@router.get("/tasks/{task_id}/events", response_model=EventPage, summary="A task's history",
            responses=error_responses(404))
def task_events(
    request: Request,
    caller: Caller,
    task_id: TaskId,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="From next_after.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1_000)] = 200,
) -> Any:
    """The task's events, oldest first, a page at a time (``after`` an event id)."""
    with _session(request, caller) as conn:
        if not store.task_visible(conn, task_id):
            raise not_found(f"task {task_id}")
        rows = store.task_events(conn, task_id, after=after, limit=limit + 1)
    events = rows[:limit]
    return {"events": events, "next_after": events[-1]["event_id"] if len(rows) > limit else None}


@router.post("/tasks/{task_id}/cancel", response_model=Task, summary="Cancel a task",
             responses=error_responses(404, 409))
def cancel_task(request: Request, caller: Caller, task_id: TaskId) -> Any:
    return _call(request, caller, store.cancel_task, task_id)


@router.post("/tasks/{task_id}/retry", response_model=RetriedTask, summary="Retry a task",
             responses=error_responses(404, 409))
def retry_task(request: Request, caller: Caller, task_id: TaskId) -> Any:
    """Run a failed or cancelled task again, with fresh counters and deadline, and a new
    ``callback_token`` (shown once; the old one no longer works)."""
    return _call(request, caller, store.retry_task, task_id)


@router.get("/stats", response_model=Stats, summary="Figures over the caller's tasks")
def stats(
    request: Request,
    caller: Caller,
    since: Annotated[DateTimeParam | None, Query(description="Default: 7 days ago.")] = None,
) -> Any:
    return _call(request, caller, store.task_stats, since)


@router.post("/callback-secret", response_model=CallbackSecret,
             summary="Create or rotate the caller's callback signing secret",
             responses=error_responses(403))
def rotate_callback_secret(
    request: Request,
    caller: Caller,
    keep_previous_seconds: Annotated[int, Query(
        ge=0, le=604_800,
        description="How long the secret it replaces keeps signing too (default a day; "
                    "0 after a leak).")] = 86_400,
) -> Any:
    """A signed-in user's own secret for their tasks' completion callbacks (Standard
    Webhooks ``webhook-signature``), returned once; workers sign with it within a few
    seconds. The service (an API key) has none: 403."""
    return _call(request, caller, store.rotate_callback_secret, keep_previous_seconds)


@router.get("/hosts", response_model=list[Host],
            summary="Remote hosts holding the caller's tasks back")
def hosts(request: Request, caller: Caller) -> Any:
    """Hosts with an open circuit, a Retry-After pause, a rate limit or recent failures,
    with how many live tasks wait on each: all of them for the service, the caller's
    own for a user."""
    return _call(request, caller, store.host_status)


# --- the seed's n8n routes -----------------------------------------------------------------


@seed_router.post(
    "/create-task",
    response_model=CreatedTask,
    status_code=201,
    summary="Create a task (the seed's webhook)",
    responses={200: {"model": CreatedTask, "description": "Idempotent replay: the existing task."}},
)
def seed_create_task(request: Request, caller: Caller, body: TaskCreate, response: Response) -> Any:
    """Same as ``POST /tasks``; answers the full task with its generated ``task_id``."""
    return _create(request, caller, body, response)


@seed_router.get("/task-status/{task_id}", response_model=TaskStatus,
                 summary="A task's status (the seed's webhook)", responses=error_responses(404))
def seed_task_status(request: Request, caller: Caller, task_id: TaskId) -> Any:
    return _call(request, caller, store.get_task_status, task_id)


@seed_router.post("/update-task/{task_id}", response_model=Task | CallbackAck,
                  summary="Report on a task (the seed's webhook)",
                  responses=error_responses(404, 409))
def seed_update_task(request: Request, caller: Caller, task_id: TaskId, body: TaskUpdate) -> Any:
    """``update_task``: with an API key as the service, answered with the task; otherwise
    the body must carry the task's ``callback_token``, answered with ``task_id`` and
    ``status`` only."""
    return _call(request, caller, store.update_task, task_id, body, body.callback_token)


# --- callbacks from third parties -----------------------------------------------------------

_ANY_JSON: dict[str, Any] = {"content": {"application/json": {"schema": {}}}}


CALLBACK_TOKEN_HEADER = "X-Taskman-Callback-Token"
_TOKEN_RULES: dict[str, Any] = {"min_length": 1, "max_length": 200, "pattern": r"^[!-~]+$"}


@public_router.post(
    "/callbacks/{task_id}",
    response_model=CallbackAck,
    summary="A third party reports on a task (token in a header, or the query string)",
    responses=error_responses(400, 403, 409, 413, 422, 503),
    openapi_extra={"requestBody": {"required": False, **_ANY_JSON}},
    dependencies=_checked,
)
async def callback(
    request: Request,
    task_id: TaskId,
    token: Annotated[str | None, Query(
        **_TOKEN_RULES, description="The task's callback_token, for remotes that cannot "
        f"send headers (prefer {CALLBACK_TOKEN_HEADER}).")] = None,
    header_token: Annotated[str | None, Header(
        alias=CALLBACK_TOKEN_HEADER, **_TOKEN_RULES,
        description="The task's callback_token.")] = None,
) -> Any:
    """For remotes that cannot authenticate to the API. The body is read as ``{status,
    result, error_message, progress, progress_message}``; anything else is read with the
    task's response profile, as a poll answer would be. A missing or wrong token is 403
    and changes nothing."""
    given = header_token or token
    if given is None:
        raise ApiError(403, "forbidden", f"Send the task's callback_token in the "
                       f"{CALLBACK_TOKEN_HEADER} header.")
    raw = await request.body()
    return await run_in_threadpool(_apply_callback, request, task_id, given, raw)


def _apply_callback(request: Request, task_id: UUID, token: str, raw: bytes) -> dict[str, Any]:
    report, problem = plain_report(raw)
    if report is None:
        # Reading the profile checks the token: a wrong one is 403 before anything is read.
        profile = _call(request, ANONYMOUS, store.callback_profile, task_id, token)
        report = report_from_profile(profile, request.headers, raw, problem)
    task = _call(request, ANONYMOUS, store.update_task, task_id, report, token)
    return {"task_id": task["task_id"], "status": task["status"]}


# --- operations -------------------------------------------------------------------------------


@public_router.get("/healthz", response_model=Health, summary="Liveness and database check",
                   responses=error_responses(503))
def healthz(request: Request) -> Any:
    try:
        with request.app.state.pool.connection(timeout=5) as conn:
            store.ping(conn)
    except psycopg.Error:
        raise ApiError(503, "database_unavailable", "The database is unavailable.") from None
    return {"status": "ok", "database": "ok"}


@public_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
               **error_responses(401)},
)
def metrics(request: Request) -> Response:
    """Open unless ``TASKMAN_METRICS_TOKEN`` is set; then only for
    ``Authorization: Bearer <that token>``."""
    expected: bytes | None = request.app.state.metrics_token
    if expected is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), expected):
            raise ApiError(
                401, "unauthorized", "Send Authorization: Bearer <TASKMAN_METRICS_TOKEN>."
            )
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# A refused stream is asked to wait this long: streams end when their clients leave.
STREAM_RETRY_AFTER_SECONDS = 30


class _EventStreamResponse(StreamingResponse):
    """The stream of one subscription, which is given back however the stream ends
    (even when the client leaves before the first byte)."""

    def __init__(self, hub: TaskEventHub, subscription: Subscription,
                 keepalive_seconds: float) -> None:
        super().__init__(
            event_stream(hub, subscription, keepalive_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._hub = hub
        self._subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.unsubscribe(self._subscription)


@router.get(
    "/events",
    summary="Task changes as Server-Sent Events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
               **error_responses(429)},
)
async def events(request: Request, caller: Caller) -> StreamingResponse:
    """``event: task`` with ``{task_id, status, user_id}`` for every change the caller may
    see (a user: their own tasks; the service: all). A ``: connected`` comment comes once
    the subscription is live, and a keep-alive comment when nothing happens. Each caller
    may hold ``TASKMAN_EVENTS_MAX_STREAMS_PER_USER`` streams, the edge
    ``TASKMAN_EVENTS_MAX_STREAMS``: past either, 429 with ``Retry-After``."""
    hub: TaskEventHub = request.app.state.hub
    try:
        subscription = hub.subscribe(caller)
    except StreamLimitReached as exc:
        raise ApiError(429, "too_many_streams", str(exc),
                       headers={"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)}) from None
    return _EventStreamResponse(hub, subscription, request.app.state.keepalive_seconds)

