"""Poll timing: retry backoff, Retry-After, adaptive intervals; no database needed."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from worker.remote.backoff import (
    MAX_RETRY_AFTER,
    is_transient_status,
    parse_retry_after,
    retry_delay,
    running_interval,
)

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("error_count", "expected_ceiling"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (50, 60.0), (10_000, 60.0)],
)
def test_retry_waits_double_per_consecutive_error_up_to_the_cap(
    error_count: int, expected_ceiling: float
) -> None:
    assert retry_delay(error_count, base=2.0, cap=60.0, rand=0.5) == expected_ceiling / 2


def test_retry_delays_are_spread_over_the_whole_window() -> None:
    rng = random.Random(7)
    delays = [retry_delay(4, base=1.0, cap=300.0, rand=rng.random()) for _ in range(1000)]
    assert all(0.0 <= d < 8.0 for d in delays)
    assert min(delays) < 0.5
    assert max(delays) > 7.5


def test_retry_delay_needs_at_least_one_error() -> None:
    with pytest.raises(ValueError, match="error_count must be at least 1"):
        retry_delay(0, base=1.0, cap=60.0, rand=0.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("99999999", MAX_RETRY_AFTER),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Mon, 23 Nov 2026 12:01:00 -0000", 60.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("Mon, 99 Foo 2026", None),
    ],
)
def test_retry_after_is_read_as_seconds_or_http_date(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("polls", "expected"),
    [
        (0, 10.0),
        (1, 10.0),
        (3, 10.0),
        (4, 15.0),
        (5, 22.5),
        (6, 33.75),
        (9, 100.0),
        (10_000, 100.0),
    ],
)
def test_long_running_task_is_polled_less_often_up_to_the_cap(polls: int, expected: float) -> None:
    assert running_interval(10.0, polls, cap=100.0) == pytest.approx(expected)


def test_running_interval_never_drops_below_the_task_interval() -> None:
    assert running_interval(30.0, 20, cap=5.0) == 30.0


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (408, True),
        (425, True),
        (429, True),
        (500, True),
        (503, True),
        (599, True),
        (200, False),
        (202, False),
        (400, False),
        (401, False),
        (404, False),
        (410, False),
    ],
)
def test_only_timeouts_rate_limits_and_server_errors_are_retried(
    code: int, transient: bool
) -> None:
    assert is_transient_status(code) is transient
