"""Reading a poll answer through a response profile (JMESPath paths and status value lists)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from worker.remote.evaluation import DEFAULT_BUDGET, BudgetedInterpreter, BudgetExceeded
from worker.remote.expression_limits import static_problem

PollState = Literal["pending", "running", "completed", "failed", "cancelled", "unreadable"]

MAX_PROGRESS_MESSAGE = 1000
MAX_ERROR_DETAIL = 2000

_PATH_FIELDS = (
    "status_path",
    "result_path",
    "progress_path",
    "progress_message_path",
    "error_path",
)
_NOT_JSON = object()


class ProfileError(ValueError):
    """A response profile that cannot be used, e.g. an invalid JMESPath expression."""


class ReadingTooCostly(ProfileError):
    """Reading one answer with the profile's expressions went past the evaluation budget."""


@dataclass(frozen=True)
class ResponseProfile:
    """A response profile with its JMESPath expressions compiled and its values casefolded."""

    name: str
    status_source: Literal["body", "http"]
    status_path: ParsedResult | None
    completed_values: frozenset[str]
    failed_values: frozenset[str]
    running_values: frozenset[str]
    pending_values: frozenset[str]
    result_path: ParsedResult | None
    progress_path: ParsedResult | None
    progress_message_path: ParsedResult | None
    error_path: ParsedResult | None
    cancelled_values: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResponseProfile:
        """Build a profile from its JSON form (as the database returns it, overrides merged).

        Missing keys take the database defaults; raises ProfileError naming the bad field.
        """
        source = d.get("status_source", "body")
        if source not in ("body", "http"):
            raise ProfileError(f"status_source must be 'body' or 'http', not {source!r}")
        paths = {field: _compile(field, d.get(field)) for field in _PATH_FIELDS}
        if source == "body" and paths["status_path"] is None:
            raise ProfileError("status_path is required when status_source is 'body'")
        return cls(
            name=d["name"],
            status_source=source,
            completed_values=_casefolded(d.get("completed_values")),
            failed_values=_casefolded(d.get("failed_values")),
            running_values=_casefolded(d.get("running_values")),
            pending_values=_casefolded(d.get("pending_values")),
            cancelled_values=_casefolded(d.get("cancelled_values")),
            **paths,
        )

    def state_of(self, status: Any) -> PollState | None:
        """The state a status value means, or None if it is in none of the lists."""
        value = str(status).casefold()
        # Checked in this order, so a value listed twice counts as the more final state.
        checks: tuple[tuple[PollState, frozenset[str]], ...] = (
            ("completed", self.completed_values),
            ("failed", self.failed_values),
            ("cancelled", self.cancelled_values),
            ("running", self.running_values),
            ("pending", self.pending_values),
        )
        for state, values in checks:
            if value in values:
                return state
        return None


@dataclass(frozen=True)
class PollReading:
    """What one poll answer says about the remote job.

    `error_detail` is raw remote text for the service only; users never see it.
    `reason` explains an 'unreadable' reading and is None otherwise.
    """

    state: PollState
    result: Any = None
    progress: int | None = None
    progress_message: str | None = None
    error_detail: str | None = None
    reason: str | None = None


def read_response(
    profile: ResponseProfile,
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    budget: int = DEFAULT_BUDGET,
) -> PollReading:
    """Read one poll answer through `profile`.

    In body mode only the JSON body counts; the caller has already dealt with HTTP errors.
    In http mode only the status code decides: 202 running, 200 completed; the caller
    follows a 303 and passes the final answer, so any other code is unreadable.
    All the expressions share one evaluation `budget` (steps); past it, or on an answer
    nested too deeply to evaluate, raises ReadingTooCostly naming the expression.
    """
    data = _parse_json(body)
    reader = _Reader(profile, BudgetedInterpreter(budget))
    if profile.status_source == "http":
        return _read_http_answer(reader, status_code, headers, body, data)
    if data is _NOT_JSON:
        return PollReading("unreadable", reason="body is not JSON")
    status = reader.search("status_path", data)
    if status is None:
        return PollReading("unreadable", reason="status_path matched nothing")
    if isinstance(status, list | dict):
        return PollReading("unreadable", reason="status_path matched a list or object, not a value")
    state = profile.state_of(status)
    if state is None:
        value = str(status)[:100]
        return PollReading(
            "unreadable", reason=f"status value {value!r} is in none of the profile's lists"
        )
    if state == "completed":
        return _reading(reader, state, data, result=reader.search("result_path", data))
    if state == "failed":
        return _reading(reader, state, data, error_detail=_error_detail(reader, data))
    return _reading(reader, state, data)


class _Reader:
    """A profile's expressions applied to one answer, sharing one budgeted interpreter."""

    def __init__(self, profile: ResponseProfile, interpreter: BudgetedInterpreter) -> None:
        self.profile = profile
        self.interpreter = interpreter

    def search(self, field: str, data: Any) -> Any:
        """Apply the profile's `field` expression; a missing expression, or one whose
        functions reject the data, yields None.

        JMESPath already yields null for most shape mismatches; treating its type errors
        the same way keeps one rule for "the answer does not have this". That includes the
        Python TypeErrors some built-in functions raise for values their signatures let
        through (``contains('a', `1`)``).
        """
        path: ParsedResult | None = getattr(self.profile, field)
        if path is None:
            return None
        try:
            return self.interpreter.search(path, data)
        except (JMESPathError, TypeError):
            return None
        except BudgetExceeded as exc:
            raise ReadingTooCostly(f"{field} could not be evaluated on the answer: {exc}") \
                from None


def _read_http_answer(
    reader: _Reader,
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    data: Any,
) -> PollReading:
    if status_code == 202:
        return _reading(reader, "running", data)
    if status_code == 200:
        if data is not _NOT_JSON:
            return _reading(reader, "completed", data, result=reader.search("result_path", data))
        # httpx decodes with the charset the headers name, else UTF-8 with replacement.
        # Only Content-Type: the body is already decompressed.
        content_type = {"content-type": headers.get("content-type", "")}
        text = httpx.Response(status_code, headers=content_type, content=body).text
        return PollReading("completed", result=text or None)
    if 300 <= status_code < 400:
        return PollReading("unreadable", reason=f"HTTP {status_code} redirect was not followed")
    return PollReading(
        "unreadable", reason=f"HTTP {status_code} is neither 202 (running) nor 200 (done)"
    )


def _reading(
    reader: _Reader,
    state: PollState,
    data: Any,
    *,
    result: Any = None,
    error_detail: str | None = None,
) -> PollReading:
    """A readable reading, with progress taken from `data` when it is JSON."""
    if data is _NOT_JSON:
        return PollReading(state, result=result, error_detail=error_detail)
    message = reader.search("progress_message_path", data)
    return PollReading(
        state,
        result=result,
        progress=_progress(reader.search("progress_path", data)),
        progress_message=message[:MAX_PROGRESS_MESSAGE] if isinstance(message, str) else None,
        error_detail=error_detail,
    )


def _progress(value: Any) -> int | None:
    """A percentage from a number or numeric string, clamped to 0..100; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return round(min(100.0, max(0.0, number)))


def _error_detail(reader: _Reader, data: Any) -> str | None:
    error = reader.search("error_path", data)
    if error is None:
        return None
    if isinstance(error, str):
        return error[:MAX_ERROR_DETAIL]
    try:
        return json.dumps(error)[:MAX_ERROR_DETAIL]
    except (ValueError, RecursionError):
        return "(the error detail could not be written out)"


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _compile(field: str, expression: str | None) -> ParsedResult | None:
    if expression is None:
        return None
    problem = static_problem(expression)
    if problem is not None:
        raise ProfileError(f"{field} {problem}")
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        raise ProfileError(f"{field} is not a valid JMESPath expression: {exc}") from None
    except RecursionError:
        raise ProfileError(f"{field} nests too deeply to compile") from None


def _casefolded(values: list[str] | None) -> frozenset[str]:
    return frozenset(v.casefold() for v in values or ())
