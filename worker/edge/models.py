"""Request and response bodies of the edge, as pydantic models (and so its OpenAPI schema).

Request models check shapes and bounds early so that no input reaches the driver in
a form it cannot send; the database remains the authority on every rule and
answers with errors that name the field. They are strict: ``"60"`` is not a number,
so what the OpenAPI schema says is exactly what is accepted.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

from worker import db


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _text(max_length: int, min_length: int = 0) -> Any:
    """A string PostgreSQL can store: no NUL characters, at most ``max_length`` long."""
    return Annotated[
        str, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)
    ]


Url = _text(2048)
Method = _text(10)
TaskType = _text(64)
ExternalId = _text(255)
HeaderName = _text(256)
HeaderValue = _text(8192)
IdempotencyKey = _text(255, min_length=1)
ErrorMessage = _text(2000)
ProgressMessage = _text(1000)
Token = _text(200)


_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_datetime(value: Any) -> Any:
    """Only ISO 8601 text: pydantic would also take a number as a Unix time."""
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_DATETIME.match(value)):
        return value
    raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")


DateTimeParam = Annotated[datetime, BeforeValidator(_iso_datetime)]

Status = Literal["pending", "in_progress", "completed", "failed", "cancelled"]
ReportedStatus = Literal["in_progress", "completed", "failed", "cancelled"]
JsonObject = dict[str, JsonValue]


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
    poll_interval_seconds: Annotated[int, Field(ge=1, le=86_400)] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=1_000)] | None = None
    timeout_minutes: Annotated[int, Field(ge=1, le=525_600)] | None = None
    callback_url: Url | None = Field(None, description="POSTed the task when it ends.")
    idempotency_key: IdempotencyKey | None = None
    metadata: JsonObject | None = None

    def query_args(self) -> dict[str, Any]:
        """The arguments of the ``edge_create_task`` query (JSON fields as jsonb)."""
        args = self.model_dump()
        for name in ("poll_headers", "poll_body", "poll_config", "metadata"):
            args[name] = db.json_arg(args[name])
        return args


class TaskReport(BaseModel):
    """What a remote (or the service) reports about a task: the arguments of ``update_task``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: ReportedStatus | None = None
    result: JsonValue = None
    error_message: ErrorMessage | None = None
    progress: Annotated[int, Field(ge=0, le=100)] | None = None
    progress_message: ProgressMessage | None = None


class TaskUpdate(TaskReport):
    """``POST /update-task/{task_id}``: a report, by the service or a callback token holder."""

    callback_token: Token | None = Field(
        None, description="The task's callback token, for callers without an API key."
    )


class TaskPatch(TaskReport):
    """``PATCH /tasks/{task_id}``: owners may change metadata only; the service anything here."""

    metadata: JsonObject | None = Field(None, description="Replaces the task's metadata.")


class Task(BaseModel):
    """A task as its owner sees it (no poll headers, no worker leases)."""

    model_config = ConfigDict(extra="allow")

    task_id: UUID
    user_id: UUID | None
    status: Status
    task_type: str
    external_id: str | None
    poll_url: str | None
    poll_method: str
    poll_body: JsonValue
    poll_config: JsonObject
    poll_interval_seconds: int
    result: JsonValue
    error_code: str | None
    error_message: str | None
    progress: int | None
    progress_message: str | None
    attempt_count: int
    error_count: int
    max_attempts: int
    timeout_minutes: int
    deadline_at: datetime
    next_poll_at: datetime | None
    last_polled_at: datetime | None
    callback_url: str | None
    idempotency_key: str | None
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class CreatedTask(Task):
    """A new task, with its callback token (shown once), or the existing one on replay."""

    callback_token: str | None = Field(
        None, description="Plain text, returned once; absent on an idempotent replay."
    )
    idempotent_replay: bool | None = Field(
        None, description="True when the idempotency_key matched an existing task."
    )


class RetriedTask(Task):
    """A task run again, with its new callback token (shown once; the old one is void)."""

    callback_token: str = Field(description="Plain text, returned once.")


class TaskStatus(BaseModel):
    """``get_task_status``: what a caller polling Taskman needs."""

    task_id: UUID
    status: Status
    progress: int | None
    progress_message: str | None
    result: JsonValue
    error_code: str | None
    error_message: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class TaskEvent(BaseModel):
    event_id: int
    task_id: UUID
    event_type: str
    from_status: str | None
    to_status: str | None
    detail: JsonObject
    created_at: datetime


class EventPage(BaseModel):
    events: list[TaskEvent]
    next_after: int | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


class DailyCount(BaseModel):
    day: date
    completed: int
    failed: int


class Durations(BaseModel):
    median: float | None
    p95: float | None


class Stats(BaseModel):
    """``task_stats``: figures over the tasks the caller may see."""

    since: datetime
    total: int
    by_status: dict[str, int]
    success_rate: float | None
    daily: list[DailyCount]
    duration_seconds: Durations


class CallbackAck(BaseModel):
    """The answer to a callback token holder's report: deliberately minimal."""

    task_id: UUID
    status: Status


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
