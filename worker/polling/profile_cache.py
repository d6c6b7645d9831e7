"""Compiled response profiles, cached by their JSON text within a byte budget.

A claim carries its task's effective profile as JSON text. Compiling it (JMESPath
parsing, value folding) once per distinct profile keeps the poll cheap; bounding the
cache by the bytes of the profiles it holds, not by their count, keeps one user's
many large profiles from growing the worker for everyone.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from worker.remote.profiles import ResponseProfile

# A compiled profile takes a few times its JSON text; this bounds the text.
DEFAULT_BUDGET_BYTES = 2 * 1024 * 1024


class ProfileCache:
    """Least-recently-used compiled profiles whose JSON texts add up to at most
    ``budget_bytes``. A profile larger than the whole budget is compiled every time."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.size_bytes = 0
        self._profiles: OrderedDict[str, ResponseProfile] = OrderedDict()

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, profile_json: object) -> bool:
        return profile_json in self._profiles

    def get(self, profile_json: str) -> ResponseProfile:
        """The compiled profile; raises ProfileError for one that cannot be used."""
        profile = self._profiles.get(profile_json)
        if profile is not None:
            self._profiles.move_to_end(profile_json)
            return profile
        profile = ResponseProfile.from_dict(json.loads(profile_json))
        size = len(profile_json)
        if size <= self.budget_bytes:
            self._profiles[profile_json] = profile
            self.size_bytes += size
            while self.size_bytes > self.budget_bytes:
                evicted, _ = self._profiles.popitem(last=False)
                self.size_bytes -= len(evicted)
        return profile
