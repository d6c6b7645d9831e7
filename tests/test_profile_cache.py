"""The worker's compiled profiles are bounded by bytes, not by how many there are."""

from __future__ import annotations

import json

import pytest

from worker.polling.profile_cache import ProfileCache
from worker.remote.profiles import ProfileError


def profile(name: str, padding: int = 0) -> str:
    return json.dumps({"name": name, "status_path": "status",
                       "completed_values": ["done", "x" * padding]})


def test_profiles_past_the_byte_budget_are_evicted_least_recently_used_first() -> None:
    cache = ProfileCache(budget_bytes=3_000)
    first, second, third = (profile(n, 900) for n in ("a", "b", "c"))
    for text in (first, second, third):
        cache.get(text)
    assert len(cache) == 3
    cache.get(first)  # used again: the second is now the oldest
    fourth = profile("d", 900)
    cache.get(fourth)
    assert cache.size_bytes <= 3_000
    assert [text in cache for text in (first, second, third, fourth)] == [True, False, True, True]
    assert cache.get(first) is cache.get(first)  # held: compiled once

def test_many_large_profiles_never_exceed_the_budget() -> None:
    cache = ProfileCache(budget_bytes=64 * 1024)
    for n in range(500):
        cache.get(profile(f"p{n}", 15_000))
        assert cache.size_bytes <= 64 * 1024
    assert len(cache) == 4


def test_a_profile_larger_than_the_budget_is_read_but_not_kept() -> None:
    cache = ProfileCache(budget_bytes=100)
    assert cache.get(profile("big", 500)).name == "big"
    assert len(cache) == 0 and cache.size_bytes == 0


def test_an_unusable_profile_is_refused_and_not_kept() -> None:
    cache = ProfileCache()
    with pytest.raises(ProfileError):
        cache.get(json.dumps({"name": "bad", "status_path": "[["}))
    assert len(cache) == 0
