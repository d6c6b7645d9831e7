"""Bounds on JMESPath expressions: the same static rules in SQL and Python, and a budget
that stops costly evaluation quickly while giving plain JMESPath's answers within it."""

from __future__ import annotations

import time
from typing import Any

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jmespath.exceptions import JMESPathError

from worker.remote.evaluation import BudgetedInterpreter, BudgetExceeded
from worker.remote.expression_limits import static_problem

# Pieces that matter to the rules (brackets, stars, quotes, escapes, calls), and others.
PIECES = [*"[]{}()*?.|&@'\"`\\ ,:=ab_9\n", "to_string(", "[*]", "[]", "[?", "\u00e9"]
EXPRESSION_TEXT = st.lists(st.sampled_from(PIECES), max_size=150).map("".join)


@settings(max_examples=300, deadline=None)
@given(expression=EXPRESSION_TEXT)
def test_the_database_and_the_worker_judge_expressions_alike(module_conn, expression) -> None:
    in_sql = module_conn.execute("select taskman_private.jmespath_problem(%s) as p",
                                 (expression,)).fetchone()["p"]
    assert in_sql == static_problem(expression)


DATA = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["a", "b", "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["a", "b", "items"]), inner, max_size=3),
    max_leaves=20)
EXPRESSIONS = st.sampled_from([
    "a", "a.b", "items[*].a", "items[?a == `1`]", "*.a", "items[]", "[a, b]", "{x: a, y: b}",
    "a || b", "a && b", "!a", "items[0:2]", "length(items)", "sort_by(items, &a)",
    "to_string(@)", "max_by(items, &a)", "items[*].[a, b][]", "contains(items, `1`)",
    "map(&a, items)", "keys(@)", "values(@)", "merge(@, `{\"z\": 1}`)", "reverse(items)",
    "join(',', items)", "not_null(a, b)", "a == b", "items | [0]", "@"])


@settings(max_examples=300, deadline=None)
@given(expression=EXPRESSIONS, data=DATA)
def test_within_the_budget_answers_are_plain_jmespaths(expression, data) -> None:
    compiled = jmespath.compile(expression)

    def outcome(run: Any) -> Any:
        try:
            return ("value", run())
        except (JMESPathError, TypeError) as exc:  # TypeError: contains('a', `1`)
            return ("error", type(exc).__name__)

    plain = outcome(lambda: compiled.search(data))
    budgeted = outcome(lambda: BudgetedInterpreter().search(compiled, data))
    assert budgeted == plain


@pytest.mark.parametrize("expression", [
    "[@,@][]" * 40,                      # doubles a list at each step
    "[@,@] | " * 60 + "to_string(@)",    # tiny in memory, astronomic written out
    "[@,@,@,@,@,@,@,@,@,@][*].to_string(@)",  # costly function, many times
    "[items, items, items, items][] | sort(@)",
    "[@,@] | " * 60 + "@",               # returned as a result: it would be written out
])
def test_costly_expressions_stop_within_the_budget_quickly(expression) -> None:
    answer = {"items": list(range(20_000)), "text": "x" * 100_000}
    started = time.perf_counter()
    with pytest.raises(BudgetExceeded):
        BudgetedInterpreter(200_000).search(jmespath.compile(expression), answer)
    assert time.perf_counter() - started < 0.5


def test_an_answer_nested_too_deeply_to_evaluate_is_over_budget() -> None:
    deep: Any = []
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(BudgetExceeded, match="nested too deeply"):
        BudgetedInterpreter().search(jmespath.compile("to_string(@)"), deep)
