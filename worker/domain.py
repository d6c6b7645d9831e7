"""Taskman's shared vocabulary: statuses, error codes, what creates a task, what a poll found.

Every layer (the store, the polling service, notifications, the edge, the CLI) takes
these names from here. The database enforces the same lists in its checks and
functions (supabase/migrations); docs/lifecycle.md maps which step decides what.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, TypedDict, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

Status = Literal["pending", "in_progress", "completed", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
# Nothing moves a task out of these but retry_task.
TERMINAL_STATUSES: frozenset[Status] = frozenset({"completed", "failed", "cancelled"})
# What a remote (or the service) may report through update_task.
ReportedStatus = Literal["in_progress", "completed", "failed", "cancelled"]

# Why a task failed (tasks.error_code).
ErrorCode = Literal["timeout", "max_attempts", "remote_failed", "invalid_response", "poll_error",
                    "submit_failed", "heartbeat_timeout"]
ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)

JsonObject = dict[str, JsonValue]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _iso_datetime(value: Any) -> Any:
    """Only ISO 8601 text (or a datetime): pydantic would also take a number as Unix time."""
    if isinstance(value, datetime) or (isinstance(value, str) and len(value) >= 16
                                       and value[4:5] == "-" and value[10:11] in "Tt "):
        return value
    raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")


# Strings PostgreSQL can store: no NUL characters, bounded lengths.
_Storable = AfterValidator(_no_nul)
Url = Annotated[str, Field(max_length=2048), _Storable]
Method = Annotated[str, Field(max_length=10), _Storable]
TaskType = Annotated[str, Field(max_length=64), _Storable]
ExternalId = Annotated[str, Field(max_length=255), _Storable]
HeaderName = Annotated[str, Field(max_length=256), _Storable]
HeaderValue = Annotated[str, Field(max_length=8192), _Storable]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255), _Storable]
ErrorMessage = Annotated[str, Field(max_length=2000), _Storable]
ProgressMessage = Annotated[str, Field(max_length=1000), _Storable]
Token = Annotated[str, Field(max_length=200), _Storable]

_DECIMAL_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


def _integer_text(value: Any) -> Any:
    """``"5"`` as 5: n8n's "Using Fields Below" sends every field as text. Anything else
    is left to strict validation, so ``"five"`` or ``"5.5"`` still fails naming the field."""
    if isinstance(value, str) and _DECIMAL_INTEGER.fullmatch(value.strip()):
        return int(value)
    return value


# An integer, given as a JSON number or as the text of a whole decimal number.
Integer = Annotated[int, BeforeValidator(_integer_text)]


StartAt = Annotated[datetime, Field(strict=False), BeforeValidator(_iso_datetime)]


class TaskCreate(BaseModel):
    """The arguments of ``create_task``; every field is optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    poll_url: Url | None = Field(
        None, description="Status URL to poll; omit for a task that waits for a callback."
    )
    poll_method: Method | None = Field(None, description="GET (default), POST, PUT or PATCH.")
    task_type: TaskType | None = Field(None, description="Category; also picks the profile.")
    external_id: ExternalId | None = None
    poll_headers: dict[HeaderName, HeaderValue] | None = Field(
        None, description="Headers sent when polling; write-only, never returned."
    )
    poll_body: JsonValue = None
    poll_config: JsonObject | None = Field(None, description="Response profile overrides.")
    poll_interval_seconds: Annotated[Integer, Field(ge=1, le=86_400)] | None = None
    max_attempts: Annotated[Integer, Field(ge=1, le=1_000)] | None = None
    timeout_minutes: Annotated[Integer, Field(ge=1, le=525_600)] | None = None
    callback_url: Url | None = Field(None, description="POSTed the task when it ends.")
    idempotency_key: IdempotencyKey | None = None
    metadata: JsonObject | None = None
    submit_url: Url | None = Field(
        None, description="Taskman starts the job: sent once, with Idempotency-Key: <task_id> "
        "(<task_id>.<16 hex> when it hands {callback_url}); the answer's handle becomes "
        "poll_url.")
    submit_method: Method | None = Field(None, description="POST (default), PUT, PATCH or GET.")
    submit_headers: dict[HeaderName, HeaderValue] | None = Field(
        None, description="Headers sent with the submit; write-only, never returned. "
        "May use {task_id} and {callback_url}.")
    submit_body: JsonValue = Field(
        None, description="JSON sent with the submit; may use {task_id} and {callback_url}.")
    callback_headers: dict[HeaderName, HeaderValue] | None = Field(
        None, description="Extra headers sent with the completion callback; write-only.")
    start_at: StartAt | None = Field(
        None, description="The first submit or poll waits for this time.")
    priority: Annotated[Integer, Field(ge=-100, le=100)] | None = Field(
        None, description="-100..100, default 0: among due tasks, higher goes first.")
    heartbeat_seconds: Annotated[Integer, Field(ge=1, le=604_800)] | None = Field(
        None, description="A started task silent this long fails with heartbeat_timeout.")


class TaskReport(BaseModel):
    """What a remote (or the service) reports about a task: the arguments of ``update_task``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: ReportedStatus | None = None
    result: JsonValue = None
    error_message: ErrorMessage | None = None
    progress: Annotated[Integer, Field(ge=0, le=100)] | None = None
    progress_message: ProgressMessage | None = None


class ClaimedTask(NamedTuple):
    """A task a worker claimed, with what polling it needs (``claim_admitted_tasks``, whose
    columns are these fields in this order: a claim's rows are made by position, about
    ten times cheaper than a frozen dataclass built from keywords).

    `poll_body` and `profile` stay JSON text: the body is sent as is, and the profile
    text is the key under which its compiled form is cached.
    """

    task_id: str
    poll_url: str | None  # None while the task is still to be submitted
    poll_method: str
    poll_headers: dict[str, str] | None  # None: none
    poll_body: str | None
    profile: str
    attempt_count: int
    error_count: int
    poll_interval_seconds: int
    # Set while the task is still to be submitted (never after a recorded success);
    # callback_token only when the submit uses {callback_url}.
    submit_url: str | None = None
    submit_method: str | None = None
    submit_headers: dict[str, str] | None = None
    submit_body: str | None = None
    callback_token: str | None = None
    # Whose it is (None: the service's own): its requests count toward that owner's
    # circuit on its host (worker.polling.hosts).
    owner: str | None = None
    # Its host holds it back (a circuit open, a pause, a rate limit): it is back in the
    # schedule, not to be sent.
    held: bool = False

    @property
    def request_url(self) -> str:
        """The URL this claim requests: the submit URL, else the status URL."""
        return self.submit_url or self.poll_url or ""


class PollOutcome(TypedDict, total=False):
    """What one poll found: one element of ``record_poll_results``' argument.

    The database decides the rest (max_attempts, the deadline, the transitions).
    """

    task_id: str  # with worker_id: the claim being answered (ignored if the lease moved on)
    worker_id: str
    ok: bool  # True: the poll worked (resets error_count); False: a transient failure
    # None: no change; cancelled goes to record_remote_cancellations, the rest to
    # record_poll_results.
    status: Literal["in_progress", "completed", "failed", "cancelled"] | None
    # With status failed: remote_failed, poll_error or invalid_response; with ok False:
    # invalid_response when the answer was unreadable.
    error_code: Literal["remote_failed", "poll_error", "invalid_response", "submit_failed"]
    delay_seconds: float  # when to poll next if the task goes on
    reason: str  # a short code for the task's events (timeout, http_status, ...)
    result: Any
    progress: int | None
    progress_message: str | None
    error_message: str | None  # neutral, shown to the owner
    http_status: int
    latency_ms: float
    raw_response: str  # service-only, like raw_error
    raw_error: str | None
    submitted: bool  # True: the outcome of a submit, not a poll
    poll_url: str  # a submit's job handle (the status URL to poll)
    external_id: str  # a submit's job id, when the profile reads one
    # For record_host_outcomes only (record_poll_results ignores them): the request's
    # host key, the task's owner, and a 429's Retry-After in seconds (the owner's tasks
    # on the host pause that long).
    host: str | None
    owner: str | None
    retry_after_seconds: float
    # Claimed, then not sent: its circuit opened meanwhile (it goes back to the
    # schedule unrecorded).
    unsent: bool


@dataclass(frozen=True)
class ServiceContext:
    """What the worker gives a long-running service beside polling (the outbox's callback
    delivery): connections from its pool, and when to look for work.

    ``wake`` is set when a NOTIFY on the service's channel arrives (and whenever the
    listener (re)connects: what was announced meanwhile); the service clears it itself.
    ``listening()`` says whether NOTIFY works now: while it does not (a transaction
    pooler without a listen URL, or the listener is down) the service looks every
    ``change_check_interval`` seconds. ``stopping`` is set at shutdown (``wake`` too):
    stop taking work, finish or leave what is in flight, and return.
    """

    connection: Callable[[], AbstractAsyncContextManager[Any]]
    wake: asyncio.Event
    stopping: asyncio.Event
    listening: Callable[[], bool]
    change_check_interval: float
