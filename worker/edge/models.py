"""Request and response bodies of the edge, as pydantic models (and so its OpenAPI schema).

The request models shared with the CLI (``TaskCreate``, ``TaskReport``) live in
worker.domain; they check shapes and bounds early so that no input reaches the driver
in a form it cannot send, while the database remains the authority on every rule and
answers with errors that name the field. They are strict, with one exception: integer
fields also take the text of a whole number (``"60"``), which n8n's "Using Fields Below"
sends for every field; ``"sixty"`` or ``"60.5"`` is still refused, naming the field.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

from worker.domain import JsonObject, Status, TaskReport, Token

_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_datetime(value: Any) -> Any:
    """Only ISO 8601 text: pydantic would also take a number as a Unix time."""
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_DATETIME.match(value)):
        return value
    raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")


DateTimeParam = Annotated[datetime, BeforeValidator(_iso_datetime)]


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
    submit_url: str | None = None
    submit_method: str | None = None
    submit_body: JsonValue = None
    submitted_at: datetime | None = Field(
        None, description="When the submit was answered with success (never submitted again).")
    start_at: datetime | None = None
    priority: int = 0
    heartbeat_seconds: int | None = None


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


class Host(BaseModel):
    """A remote host holding tasks back (open circuit, Retry-After pause, rate limit)
    or failing, and how many of the caller's live tasks wait on it."""

    host: str = Field(description="scheme://host:port, as Taskman keys hosts")
    state: Literal["closed", "open", "paused"]
    since: datetime | None = Field(description="When the circuit opened (if open).")
    next_probe_at: datetime | None
    paused_until: datetime | None
    consecutive_failures: int
    last_error: str | None
    rate_limit: float | None = Field(description="Requests per second, for all workers.")
    owners_held: int = Field(
        default=0, description="Owners whose own circuit or pause holds their tasks on the "
        "host (the service's view; 0 for a user).")
    tasks_waiting: int


class CallbackAck(BaseModel):
    """The answer to a callback token holder's report: deliberately minimal."""

    task_id: UUID
    status: Status


class CallbackSecret(BaseModel):
    """The caller's new callback signing secret, shown once."""

    secret: str = Field(description="whsec_<base64>: give it to your receivers; shown once.")
    rotated_at: datetime
    previous_valid_until: datetime | None = Field(
        description="Until when the secret it replaced still signs too (None: it stopped).")


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
