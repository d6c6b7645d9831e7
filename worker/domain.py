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
from typing import Annotated, Any, Literal, TypedDict, get_args
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

Status = Literal["pending", "in_progress", "completed", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
# Nothing moves a task out of these but retry_task.
TERMINAL_STATUSES: frozenset[Status] = frozenset({"completed", "failed", "cancelled"})
# What a remote (or the service) may report through update_task.
ReportedStatus = Literal["in_progress", "completed", "failed", "cancelled"]

# Why a task failed (tasks.error_code).
ErrorCode = Literal["timeout", "max_attempts", "remote_failed", "invalid_response", "poll_error"]
ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)

JsonObject = dict[str, JsonValue]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


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


class TaskReport(BaseModel):
    """What a remote (or the service) reports about a task: the arguments of ``update_task``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: ReportedStatus | None = None
    result: JsonValue = None
    error_message: ErrorMessage | None = None
    progress: Annotated[Integer, Field(ge=0, le=100)] | None = None
    progress_message: ProgressMessage | None = None


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task a worker claimed, with what polling it needs (``claim_due_tasks``).

    `poll_body` and `profile` stay JSON text: the body is sent as is, and the profile
    text is the key under which its compiled form is cached.
    """

    task_id: UUID
    poll_url: str
    poll_method: str
    poll_headers: dict[str, str]
    poll_body: str | None
    profile: str
    attempt_count: int
    error_count: int
    poll_interval_seconds: int


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
    error_code: Literal["remote_failed", "poll_error", "invalid_response"]
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
