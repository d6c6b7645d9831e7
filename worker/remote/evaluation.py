"""JMESPath evaluation within a budget, so that no answer and no expression can hold the worker.

A short expression can ask for work that grows exponentially (``[@,@][]`` repeated
doubles a list each time) or build a value that is tiny in memory but enormous once
written out (``[@,@] | [@,@] | ...`` shares one list between both slots). The
interpreter here charges every node it visits, every element of a list or object it
builds, the size of what costly functions and comparisons work on, and the written-out
size of any value it built and returns; past the budget it raises BudgetExceeded. So one
answer costs the worker at most about ``budget`` steps, plus one walk over the parsed
answer itself (which the response size cap bounds).

Sizes count JSON nodes as written out, shared parts as often as they appear, and one
step per 16 bytes of text in strings and in parts of the answer; each distinct node is
measured once per answer.
"""

from __future__ import annotations

import json
from typing import Any

from jmespath import functions
from jmespath.parser import ParsedResult
from jmespath.visitor import Options, TreeInterpreter, _Expression, _is_comparable

DEFAULT_BUDGET = 200_000
_BYTES_PER_STEP = 16  # of JSON text (or of a string), in what sizes count
# Functions whose cost does not depend on the size of their arguments.
_CHEAP_FUNCTIONS = frozenset({"abs", "ceil", "floor", "length", "not_null", "to_array",
                              "to_number", "type", "starts_with", "ends_with"})
_OPTIONS = Options(custom_functions=functions.Functions())


class BudgetExceeded(Exception):
    """Evaluating an expression needed more than its budget (or nested too deeply)."""


class BudgetedInterpreter(TreeInterpreter):
    """A TreeInterpreter that stops once it has spent `budget` steps.

    One instance evaluates all the expressions that read one answer, so they share
    the budget. Not thread-safe; create one per answer.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        super().__init__(_OPTIONS)
        self.budget = budget
        self.remaining = budget
        self._built: dict[int, Any] = {}  # id -> container built here, kept alive
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (container, size)

    def search(self, expression: ParsedResult, data: Any) -> Any:
        """Evaluate `expression` against `data`; raises BudgetExceeded past the budget."""
        try:
            value = self.visit(expression.parsed, data)
            if isinstance(value, list | dict) and id(value) in self._built:
                self._charge(self.size(value))  # it will be written out: count it all
        except RecursionError:
            raise BudgetExceeded("the answer is nested too deeply to evaluate") from None
        return value

    def size(self, value: Any) -> int:
        """Steps `value` is worth: its JSON nodes written out, shared parts counted as often
        as they appear. Memoized per distinct node; built values are walked (aborting past
        the budget), parts of the answer itself are measured by their JSON text."""
        if not isinstance(value, list | dict):
            return _scalar_size(value)
        sizes = self._sizes
        if id(value) in sizes:
            return sizes[id(value)][1]
        if id(value) not in self._built:
            sizes[id(value)] = (value, _data_size(value))
            return sizes[id(value)][1]
        walked = 0
        stack: list[tuple[Any, bool]] = [(value, False)]
        while stack:
            node, children_done = stack.pop()
            if id(node) in sizes:
                continue
            children = node.values() if isinstance(node, dict) else node
            if not children_done:
                walked += 1 + len(node)
                if walked > self.remaining:
                    raise BudgetExceeded(f"evaluation needed more than {self.budget} steps")
                stack.append((node, True))
                for child in children:
                    if isinstance(child, list | dict) and id(child) not in sizes:
                        if id(child) in self._built:
                            stack.append((child, False))
                        else:
                            sizes[id(child)] = (child, _data_size(child))
                continue
            total = 1
            for child in children:
                total += (sizes[id(child)][1] if isinstance(child, list | dict)
                          else _scalar_size(child))
            sizes[id(node)] = (node, total)
        return sizes[id(value)][1]

    # Accounting ------------------------------------------------------------------------

    def _charge(self, steps: int) -> None:
        self.remaining -= steps
        if self.remaining < 0:
            raise BudgetExceeded(f"evaluation needed more than {self.budget} steps")

    def _built_value(self, value: Any) -> Any:
        if isinstance(value, list | dict):
            self._charge(len(value))
            self._built[id(value)] = value
        return value

    # The interpreter, charged ------------------------------------------------------------

    def visit(self, node: dict[str, Any], value: Any) -> Any:
        self.remaining -= 1
        if self.remaining < 0:
            raise BudgetExceeded(f"evaluation needed more than {self.budget} steps")
        node_type = node["type"]
        method = self._method_cache.get(node_type)
        if method is None:
            method = getattr(self, "visit_" + node_type, self.default_visit)
            self._method_cache[node_type] = method
        return method(node, value)

    def visit_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_projection(node, value))

    def visit_value_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_value_projection(node, value))

    def visit_filter_projection(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_filter_projection(node, value))

    def visit_multi_select_list(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_multi_select_list(node, value))

    def visit_multi_select_dict(self, node: dict[str, Any], value: Any) -> Any:
        return self._built_value(super().visit_multi_select_dict(node, value))

    def visit_flatten(self, node: dict[str, Any], value: Any) -> Any:
        base = self.visit(node["children"][0], value)
        if not isinstance(base, list):
            return None
        # Charged before the copy: flattening k references to one long list is k times its work.
        self._charge(sum(len(e) if isinstance(e, list) else 1 for e in base))
        merged: list[Any] = []
        for element in base:
            if isinstance(element, list):
                merged.extend(element)
            else:
                merged.append(element)
        self._built[id(merged)] = merged
        return merged

    def visit_slice(self, node: dict[str, Any], value: Any) -> Any:
        if not isinstance(value, list):
            return None
        bounds = slice(*node["children"])
        self._charge(len(range(*bounds.indices(len(value)))))
        sliced = value[bounds]
        self._built[id(sliced)] = sliced
        return sliced

    def visit_comparator(self, node: dict[str, Any], value: Any) -> Any:
        left = self.visit(node["children"][0], value)
        right = self.visit(node["children"][1], value)
        if isinstance(left, list | dict) or isinstance(right, list | dict):
            self._charge(self.size(left) + self.size(right))  # == compares them deeply
        compare = self.COMPARATOR_FUNC[node["value"]]
        if node["value"] in self._EQUALITY_OPS:
            return compare(left, right)
        if not (_is_comparable(left) and _is_comparable(right)):
            return None
        return compare(left, right)

    def visit_function_expression(self, node: dict[str, Any], value: Any) -> Any:
        args = [self.visit(child, value) for child in node["children"]]
        if node["value"] not in _CHEAP_FUNCTIONS:
            self._charge(sum(self.size(a) for a in args if not isinstance(a, _Expression)))
        return self._built_value(self._functions.call_function(node["value"], args))


def _scalar_size(value: Any) -> int:
    return 1 + len(value) // _BYTES_PER_STEP if isinstance(value, str) else 1


def _data_size(value: list[Any] | dict[str, Any]) -> int:
    """A part of the parsed answer: a tree, so its JSON text measures it (at C speed)."""
    return 1 + len(json.dumps(value)) // _BYTES_PER_STEP
