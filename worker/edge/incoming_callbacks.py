"""Reading a third party's callback body: Taskman's own report shape, else the task's
response profile (as a poll answer would be read). Pure functions, no I/O. A result that
could not be stored (NaN, say, which Python reads but JSON cannot write) is refused here,
naming the field as the database would."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from worker.domain import TaskReport
from worker.edge.errors import ApiError
from worker.remote.json_bounds import json_problem
from worker.remote.profiles import ProfileError, ResponseProfile, read_response

_STATUS_OF_STATE = {"completed": "completed", "failed": "failed", "running": "in_progress"}


def plain_report(raw: bytes) -> tuple[TaskReport | None, str | None]:
    """The body as ``{status, result, error_message, progress, progress_message}``.

    Else None, and, if the body has only that shape's fields but bad values, what is
    wrong with them (so that an unreadable body gets the more useful message). An
    empty body is an empty report.
    """
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict) or not data.keys() <= TaskReport.model_fields.keys():
        return None, None
    try:
        report = TaskReport.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        return None, f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return _storable(report), None


def _storable(report: TaskReport) -> TaskReport:
    """`report`, if its result can be stored; else ApiError 422 naming the result."""
    if problem := json_problem(report.result):
        raise ApiError(422, "invalid_argument", f"result {problem}", "result")
    return report


def report_from_profile(
    profile: Mapping[str, Any], headers: Mapping[str, str], raw: bytes, problem: str | None
) -> TaskReport:
    """The report a body means when read with ``profile`` (the task's effective profile,
    as ``callback_profile`` returns it); ApiError 422 if it cannot be read.

    A remote's own error text stays out of what users see: a failure gets the neutral
    message. The database checks the values read, as for any report.
    """
    try:
        reader = ResponseProfile.from_dict(profile)
    except ProfileError as exc:
        raise ApiError(
            422, "invalid_profile", f"The task's response profile is unusable: {exc}"
        ) from None
    try:
        reading = read_response(reader, 200, headers, raw)
    except ProfileError as exc:  # the budget ran out: the same answer a poll would get
        raise ApiError(422, "unreadable_callback", f"The body cannot be read: {exc}.") from None
    if reading.state == "unreadable":
        why = problem or f"with the task's profile {reader.name!r}, {reading.reason}"
        raise ApiError(
            422,
            "unreadable_callback",
            "The body is neither Taskman's report shape (status, result, error_message, "
            f"progress, progress_message) nor readable: {why}.",
        )
    status = _STATUS_OF_STATE.get(reading.state)  # pending: progress only
    return _storable(TaskReport.model_construct(
        status=status,
        result=reading.result if status == "completed" else None,
        error_message=None,
        progress=reading.progress,
        progress_message=reading.progress_message,
    ))
