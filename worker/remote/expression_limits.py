"""Static bounds on JMESPath expressions, judged from their text before any answer is read.

The database applies the same rules with the same messages
(``taskman_private.jmespath_problem``); the worker checks again when it compiles a
profile, so an expression written before the bounds existed cannot slip through.
Literals (quoted identifiers, raw strings, JSON literals) are blanked first, so
brackets or stars inside them do not count.
"""

from __future__ import annotations

import re

MAX_LENGTH = 500
MAX_DEPTH = 10  # brackets, braces and parentheses inside each other
MAX_PROJECTIONS = 5  # [*], [], .* and [?...]
MAX_FUNCTIONS = 8

_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`(?:\\.|[^`\\])*`', re.DOTALL)
_FUNCTION_CALL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*\(")
_OPENING, _CLOSING = frozenset("[({"), frozenset("])}")


def static_problem(expression: str) -> str | None:
    """What makes `expression` too large or too complex to accept, or None if it is within
    the bounds. Says nothing about its syntax: compiling it does that."""
    if len(expression) > MAX_LENGTH:
        return f"is longer than {MAX_LENGTH} characters"
    code = _LITERAL.sub("0", expression)
    depth = deepest = 0
    for char in code:
        if char in _OPENING:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSING:
            depth -= 1
    if deepest > MAX_DEPTH:
        return f"nests brackets {deepest} deep; at most {MAX_DEPTH} levels are allowed"
    projections = code.count("*") + code.count("[]") + code.count("[?")
    if projections > MAX_PROJECTIONS:
        return (f"has {projections} projections ([*], [], .*, [?...]); "
                f"at most {MAX_PROJECTIONS} are allowed")
    functions = len(_FUNCTION_CALL.findall(code))
    if functions > MAX_FUNCTIONS:
        return f"has {functions} function calls; at most {MAX_FUNCTIONS} are allowed"
    return None
