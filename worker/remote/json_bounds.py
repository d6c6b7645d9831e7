"""What JSON Taskman stores: nested at most MAX_DEPTH deep, numbers of magnitude below
MAX_MAGNITUDE, finite. The database refuses anything else where it is written
(``taskman_private.json_problem``, the same rules and words); the worker checks a poll's
result here first, so that an answer it cannot store fails its own task, not a batch.

Deeper documents and larger numbers could not be served: the edge's response models stop
near 250 levels and Python's JSON near 1,000; Python reads an integer of more than 4,300
digits as an error and a larger fraction as infinity, which (like NaN) JSON cannot write.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 64
MAX_MAGNITUDE = 1e308
_MAX_INTEGER = 10**308
_TOO_DEEP = f"must nest arrays and objects at most {MAX_DEPTH} deep"
_TOO_LARGE = "must hold only numbers of magnitude below 1e308"


def json_problem(value: Any) -> str | None:
    """Why `value` (as ``json.loads`` returns it) cannot be stored, or None. Iterative, so
    that no depth of nesting can exhaust the stack; about as costly as ``json.dumps``."""
    kind = type(value)
    pending: list[tuple[Any, int]] = [(value if kind is dict or kind is list else [value], 0)]
    while pending:
        container, depth = pending.pop()
        if depth == MAX_DEPTH:  # a 65th level
            return _TOO_DEEP
        for child in container.values() if type(container) is dict else container:
            kind = type(child)
            if kind is dict or kind is list:
                pending.append((child, depth + 1))
            elif kind is float:
                if not abs(child) < MAX_MAGNITUDE:  # NaN and Infinity too: no JSON numbers
                    return _TOO_LARGE
            elif kind is int and (child >= _MAX_INTEGER or -child >= _MAX_INTEGER):
                return _TOO_LARGE
    return None
