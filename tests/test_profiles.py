"""Reading poll answers through response profiles; no database needed."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from worker.remote.profiles import PollReading, ProfileError, ResponseProfile, read_response

# The built-in profiles as supabase/migrations/*_response_profiles.sql seeds them.
BUILTIN: dict[str, dict[str, Any]] = {
    "generic": {
        "name": "generic",
        "status_source": "body",
        "status_path": "status || state",
        "completed_values": [
            "done",
            "completed",
            "complete",
            "succeeded",
            "success",
            "ok",
            "finished",
        ],
        "failed_values": ["failed", "error", "failure", "errored"],
        "cancelled_values": ["cancelled", "canceled", "revoked", "aborted"],
        "running_values": ["running", "in_progress", "processing", "started", "active"],
        "pending_values": ["pending", "queued", "waiting", "created", "submitted"],
        "result_path": "result || data || output",
        "progress_path": "progress",
        "progress_message_path": "progress_message || message",
        "error_path": "error.message || error || error_message",
    },
    "celery": {
        "name": "celery",
        "status_source": "body",
        "status_path": "status || state",
        "completed_values": ["SUCCESS"],
        "failed_values": ["FAILURE"],
        "cancelled_values": ["REVOKED"],
        "running_values": ["STARTED", "RETRY", "PROGRESS"],
        "pending_values": ["PENDING", "RECEIVED"],
        "result_path": "result",
        "progress_path": "info.progress || meta.progress || progress",
        "progress_message_path": "info.message || meta.message",
        "error_path": "traceback || result",
    },
    "standard": {
        "name": "standard",
        "status_source": "body",
        "status_path": "status",
        "completed_values": ["ok"],
        "failed_values": ["failed", "timeout"],
        "cancelled_values": [],
        "running_values": ["running"],
        "pending_values": ["pending"],
        "result_path": "data",
        "progress_path": "progress",
        "progress_message_path": "message",
        "error_path": "error.message",
    },
    "http": {
        "name": "http",
        "status_source": "http",
        "status_path": None,
        "completed_values": [],
        "failed_values": [],
        "cancelled_values": [],
        "running_values": [],
        "pending_values": [],
        "result_path": "@",
        "progress_path": "progress",
        "progress_message_path": "message",
        "error_path": "error.message || error",
    },
}


def profile(name: str = "generic", **overrides: Any) -> ResponseProfile:
    return ResponseProfile.from_dict({**BUILTIN[name], **overrides})


def read_json(prof: ResponseProfile, body: Any, status_code: int = 200) -> PollReading:
    return read_response(prof, status_code, {}, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        (
            "generic",
            {"status": "done", "result": {"url": "s3://r"}},
            PollReading("completed", result={"url": "s3://r"}),
        ),
        (
            "generic",
            {"state": "Running", "progress": 40, "message": "step 2"},
            PollReading("running", progress=40, progress_message="step 2"),
        ),
        ("generic", {"status": "QUEUED"}, PollReading("pending")),
        (
            "generic",
            {"status": "succeeded", "data": [1, 2]},
            PollReading("completed", result=[1, 2]),
        ),
        (
            "celery",
            {"task_id": "abc", "status": "SUCCESS", "result": 42},
            PollReading("completed", result=42),
        ),
        (
            "celery",
            {"state": "PROGRESS", "info": {"progress": 75, "message": "rendering"}},
            PollReading("running", progress=75, progress_message="rendering"),
        ),
        ("celery", {"status": "pending"}, PollReading("pending")),
        (
            "standard",
            {"status": "ok", "data": {"rows": 10}},
            PollReading("completed", result={"rows": 10}),
        ),
        (
            "standard",
            {"status": "timeout", "error": {"message": "took too long"}},
            PollReading("failed", error_detail="took too long"),
        ),
    ],
)
def test_builtin_profiles_read_their_services_answers(
    name: str, body: Any, expected: PollReading
) -> None:
    assert read_json(profile(name), body) == expected


def test_celery_failure_is_failed_with_traceback_kept_service_side() -> None:
    body = {
        "status": "FAILURE",
        "result": "ZeroDivisionError('x')",
        "traceback": "Traceback (most recent call last):\n  ...",
    }
    reading = read_json(profile("celery"), body)
    assert reading.state == "failed"
    assert reading.error_detail == body["traceback"]
    assert reading.result is None


def test_failed_task_without_error_text_has_no_detail() -> None:
    assert read_json(profile("generic"), {"status": "failed"}) == PollReading("failed")


def test_structured_remote_error_is_kept_as_json_text() -> None:
    reading = read_json(profile("generic"), {"status": "error", "error": {"code": 7}})
    assert reading.error_detail == '{"code": 7}'


def test_long_remote_texts_are_truncated() -> None:
    body = {"status": "failed", "error": "e" * 5000, "message": "m" * 5000}
    reading = read_json(profile("generic"), body)
    assert reading.error_detail == "e" * 2000
    assert reading.progress_message == "m" * 1000


@pytest.mark.parametrize(
    ("status", "completed_values", "expected"),
    [
        (True, ["true"], "completed"),
        (1, ["1"], "completed"),
        ("Done", ["DONE"], "completed"),
        ("straße", ["STRASSE"], "completed"),
    ],
)
def test_status_values_match_ignoring_case_and_type(
    status: Any, completed_values: list[str], expected: str
) -> None:
    prof = profile(status_path="done", completed_values=completed_values)
    assert read_json(prof, {"done": status}).state == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>Bad gateway</html>", "body is not JSON"),
        (b"", "body is not JSON"),
        (b"[" * 100_000, "body is not JSON"),
        (b'{"phase": "done"}', "status_path matched nothing"),
        (b'["done"]', "status_path matched nothing"),
        (b'{"status": "weird"}', "status value 'weird' is in none of the profile's lists"),
    ],
)
def test_answers_the_profile_cannot_read_are_unreadable_with_a_reason(
    body: bytes, reason: str
) -> None:
    assert read_response(profile("generic"), 200, {}, body) == PollReading(
        "unreadable", reason=reason
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, 42),
        (42.6, 43),
        ("55", 55),
        (" 7.2 ", 7),
        (150, 100),
        (-3, 0),
        ("half", None),
        ("NaN", None),
        (True, None),
        ([50], None),
        (None, None),
    ],
)
def test_progress_is_a_clamped_whole_percentage_or_nothing(
    value: Any, expected: int | None
) -> None:
    assert (
        read_json(profile("generic"), {"status": "running", "progress": value}).progress == expected
    )


def test_non_text_progress_message_is_ignored() -> None:
    reading = read_json(profile("generic"), {"status": "running", "message": {"step": 3}})
    assert reading.progress_message is None


def test_path_whose_function_rejects_the_answer_reads_as_missing() -> None:
    prof = profile(progress_path="abs(progress)")
    assert read_json(prof, {"status": "running", "progress": "x"}) == PollReading("running")


def test_overridden_paths_read_a_custom_service() -> None:
    prof = profile(
        status_path="job.phase",
        completed_values=["archived"],
        result_path="job.outputs[0].href",
    )
    body = {"job": {"phase": "ARCHIVED", "outputs": [{"href": "https://x/r.csv"}]}}
    assert read_json(prof, body) == PollReading("completed", result="https://x/r.csv")


@pytest.mark.parametrize(
    ("status_code", "headers", "body", "expected"),
    [
        (202, {}, b"", PollReading("running")),
        (
            202,
            {},
            b'{"progress": 30, "message": "encoding"}',
            PollReading("running", progress=30, progress_message="encoding"),
        ),
        (202, {}, b"accepted", PollReading("running")),
        (
            200,
            {},
            b'{"url": "https://x/r"}',
            PollReading("completed", result={"url": "https://x/r"}),
        ),
        (200, {}, b"plain report", PollReading("completed", result="plain report")),
        (200, {}, b"", PollReading("completed")),
        (200, {}, b"caf\xff", PollReading("completed", result="caf\ufffd")),
        (
            200,
            {"content-type": "text/plain; charset=latin-1"},
            b"caf\xe9",
            PollReading("completed", result="caf\u00e9"),
        ),
    ],
)
def test_http_profile_reads_the_status_code(
    status_code: int, headers: dict[str, str], body: bytes, expected: PollReading
) -> None:
    assert read_response(profile("http"), status_code, headers, body) == expected


@pytest.mark.parametrize(
    ("status_code", "reason"),
    [
        (303, "HTTP 303 redirect was not followed"),
        (204, "HTTP 204 is neither 202 (running) nor 200 (done)"),
        (404, "HTTP 404 is neither 202 (running) nor 200 (done)"),
    ],
)
def test_http_profile_cannot_read_other_status_codes(status_code: int, reason: str) -> None:
    reading = read_response(profile("http"), status_code, {}, b'{"status": "done"}')
    assert reading == PollReading("unreadable", reason=reason)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"result_path": "data[["}, "result_path is not a valid JMESPath expression"),
        ({"status_path": ""}, "status_path is not a valid JMESPath expression"),
        ({"status_path": None}, "status_path is required when status_source is 'body'"),
        ({"status_source": "xml"}, "status_source must be 'body' or 'http', not 'xml'"),
    ],
)
def test_broken_profile_is_refused_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProfileError, match=re.escape(message)):
        profile(**overrides)


def test_a_function_python_refuses_on_the_answer_reads_as_missing_not_as_a_crash() -> None:
    # jmespath's contains() accepts any subject but raises TypeError for `1 in 'done'`.
    profile = ResponseProfile.from_dict({
        **BUILTIN["generic"], "status_path": "status",
        "result_path": "contains(status, count)"})
    reading = read_response(profile, 200, {}, json.dumps({"status": "done", "count": 1}).encode())
    assert reading.state == "completed" and reading.result is None
