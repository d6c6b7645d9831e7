"""The job handle in a submit's answer, and the placeholders of a submit request.

Pure functions, no I/O. A handle is the ``Location`` of a 201/202/303 answer (resolved
against the submit URL), else what the profile's ``poll_url_path`` reads (a URL, also
resolved), else the profile's ``poll_url_template`` with the ``job_id_path`` value in
place of ``{job_id}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jmespath
from jmespath.exceptions import JMESPathError
from yarl import URL

from worker.remote.evaluation import BudgetedInterpreter, BudgetExceeded
from worker.remote.expression_limits import static_problem
from worker.remote.profiles import ProfileError, ReadingTooCostly

LOCATION_STATUSES = frozenset({201, 202, 303})
MAX_URL = 2048
MAX_JOB_ID = 255


@dataclass(frozen=True)
class Handle:
    """Where the job is polled, and its id when read."""

    poll_url: str
    job_id: str | None = None


class NoHandle(ValueError):
    """The answer names no job handle that can be used; the message says why."""


def read_handle(profile: Mapping[str, Any], submit_url: str, status: int,
                headers: Mapping[str, str], body: bytes, budget: int) -> Handle | None:
    """The handle the answer gives, or None if it gives none; NoHandle if what it gives
    cannot be used (not an http(s) URL, a job id that is not a string or a number),
    ReadingTooCostly past the evaluation budget, ProfileError for a bad expression."""
    job_id = _job_id(profile, body, budget)
    location = headers.get("location")
    if status in LOCATION_STATUSES and location:
        return Handle(_resolved(submit_url, location, "the Location header"), job_id)
    data = _json(body)
    path = profile.get("poll_url_path")
    if path and data is not None:
        url = _search("poll_url_path", path, data, budget)
        if url is not None:
            if not isinstance(url, str):
                raise NoHandle("poll_url_path matched a value that is not a URL")
            return Handle(_resolved(submit_url, url, "poll_url_path"), job_id)
    template = profile.get("poll_url_template")
    if job_id is not None and template:
        return Handle(_checked(template.replace("{job_id}", quote(job_id, safe="")),
                               "poll_url_template"), job_id)
    return None


def fill_placeholders(value: Any, values: Mapping[str, str]) -> Any:
    """`value` (JSON) with every ``{name}`` of `values` replaced in its strings."""
    if isinstance(value, str):
        for name, text in values.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [fill_placeholders(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, values) for k, v in value.items()}
    return value


def uses_placeholder(texts: list[str | None], name: str) -> bool:
    """Whether any of `texts` contains ``{name}``."""
    return any(t is not None and "{" + name + "}" in t for t in texts)


def _job_id(profile: Mapping[str, Any], body: bytes, budget: int) -> str | None:
    path = profile.get("job_id_path")
    data = _json(body) if path else None
    if not path or data is None:
        return None
    found = _search("job_id_path", path, data, budget)
    if found is None:
        return None
    if isinstance(found, bool) or not isinstance(found, str | int | float):
        raise NoHandle("job_id_path matched a list or object, not a job id")
    job_id = found if isinstance(found, str) else json.dumps(found)
    if not job_id or len(job_id) > MAX_JOB_ID:
        raise NoHandle(f"job_id_path matched an id that is empty or over {MAX_JOB_ID} characters")
    return job_id


def _search(field: str, expression: str, data: Any, budget: int) -> Any:
    problem = static_problem(expression)
    if problem is not None:
        raise ProfileError(f"{field} {problem}")
    try:
        compiled = jmespath.compile(expression)
    except (JMESPathError, RecursionError) as exc:
        raise ProfileError(f"{field} is not a valid JMESPath expression: {exc}") from None
    try:
        return BudgetedInterpreter(budget).search(compiled, data)
    except (JMESPathError, TypeError):
        return None
    except BudgetExceeded as exc:
        raise ReadingTooCostly(f"{field} could not be evaluated on the answer: {exc}") from None


def _resolved(base: str, target: str, where: str) -> str:
    try:
        url = str(URL(base).join(URL(target)))
    except (ValueError, TypeError):
        raise NoHandle(f"{where} is not a valid URL") from None
    return _checked(url, where)


def _checked(url: str, where: str) -> str:
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise NoHandle(f"{where} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or len(url) > MAX_URL:
        raise NoHandle(f"{where} gives {url[:200]!r}, not an http(s) URL of at most "
                       f"{MAX_URL} characters")
    return url


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        return None
