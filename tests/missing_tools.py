"""What a test does when the machine lacks a tool it needs: skip locally, fail in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(message: str) -> NoReturn:
    """Skip with `message`, except in CI (CI set, as .ci/run sets it), where every test
    must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI runs every test", pytrace=False)
    pytest.skip(message)
