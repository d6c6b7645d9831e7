"""Which poll headers can be sent: RFC 9110 field names and values, as the database checks them.

A name is a token. A value is visible ASCII, with spaces and tabs inside but not at its
ends; no control characters (so no CR, LF or NUL) and no obs-text: a JSON string is
Unicode, HTTP sends bytes, and RFC 9110 says new fields should stick to ASCII, so a
non-ASCII value is refused rather than sent in some guessed encoding. Headers that
frame the message are the HTTP client's to set, not a task's.
``taskman_private.validate_poll_headers`` applies the same rules at creation; the
poller checks again for tasks stored before them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_VALUE = re.compile(r"(?:[!-~](?:[ \t!-~]*[!-~])?)?")
FRAMING_HEADERS = frozenset({"connection", "content-length", "keep-alive", "proxy-connection",
                             "te", "trailer", "transfer-encoding", "upgrade"})


def headers_problem(headers: Mapping[str, object], kind: str = "poll") -> str | None:
    """Why `headers` (a task's `kind` headers: poll, submit, callback) cannot be sent as
    they are, naming the header; None if they can."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            return f"{kind} header name {name[:60]!r} is not a valid HTTP field name"
        if name.lower() in FRAMING_HEADERS:
            return f"{kind} header {name!r} is set by Taskman's HTTP client, not by a task"
        if not isinstance(value, str) or not _VALUE.fullmatch(value):
            return (f"{kind} header {name!r} has a value that is not valid in HTTP (visible "
                    "ASCII only, with spaces or tabs inside; no line breaks or control "
                    "characters)")
    return None
