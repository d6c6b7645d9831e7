"""Timing decisions for polls: retry backoff, Retry-After, adaptive intervals."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# A server asking to wait longer than a day is capped to a day; the task's deadline
# bounds the wait anyway, and a bogus header should not park a task for years.
MAX_RETRY_AFTER = 86_400.0

# Adaptive polling: the first STEADY_POLLS "still running" answers keep the base interval,
# then each further one multiplies it by RUNNING_GROWTH, up to the cap.
STEADY_POLLS = 3
RUNNING_GROWTH = 1.5

# Exponents are bounded so the power cannot overflow a float; 2**100 and 1.5**100 exceed
# any sensible cap by far.
_MAX_EXPONENT = 100


def retry_delay(
    error_count: int, base: float, cap: float, rand: float, *, floor: float = 0.0
) -> float:
    """Seconds to wait after the `error_count`-th consecutive failed poll (1 or more).

    Exponential backoff with full jitter, above a floor: uniform between `floor` and
    `min(cap, base * 2**(error_count - 1))` for `rand` uniform in [0, 1); never below
    `floor` (``rand * window`` when the floor is 0).
    """
    if error_count < 1:
        raise ValueError(f"error_count must be at least 1, not {error_count}")
    exponent = min(error_count - 1, _MAX_EXPONENT)
    window = min(cap, base * 2.0**exponent)
    return floor + rand * max(0.0, window - floor)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a Retry-After header asks to wait, or None if it is absent or unreadable.

    Accepts delta-seconds (integer or decimal) and HTTP dates; negative values and past
    dates give 0, and anything above MAX_RETRY_AFTER is capped to it. `now` must be aware.
    """
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC with no offset known
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def running_interval(base_seconds: float, polls_while_running: int, cap: float) -> float:
    """Seconds until the next poll of a task after `polls_while_running` "still running" answers.

    Stays at `base_seconds` for the first STEADY_POLLS answers, then grows by RUNNING_GROWTH
    per answer up to `cap`; never below `base_seconds`, even if `cap` is smaller.
    """
    exponent = min(max(0, polls_while_running - STEADY_POLLS), _MAX_EXPONENT)
    return max(base_seconds, min(cap, base_seconds * RUNNING_GROWTH**exponent))


def is_transient_status(code: int) -> bool:
    """Whether an HTTP status on a poll is worth retrying: 408, 425, 429 and 5xx."""
    return code in (408, 425, 429) or 500 <= code <= 599
