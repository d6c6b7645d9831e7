"""The edge's access log, with callback tokens redacted.

``POST /callbacks/{task_id}?token=…`` carries a write capability over the task in its
query string; uvicorn would log it verbatim. Proxies in front log it too, which is why
the docs recommend the ``X-Taskman-Callback-Token`` header.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

from uvicorn.config import LOGGING_CONFIG

_TOKEN = re.compile(r"([?&]token=)[^&#\s]*", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(path: str) -> str:
    """``path`` with the value of every ``token`` query parameter replaced."""
    return _TOKEN.sub(rf"\g<1>{REDACTED}", path)


class RedactTokens(logging.Filter):
    """Rewrites uvicorn's access records, whose arguments are (client, method, path,
    HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], redact(args[2]), *args[3:])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with tokens redacted from the access log."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    config["handlers"]["access"]["filters"] = ["redact_tokens"]
    return config
