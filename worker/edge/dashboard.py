"""The dashboard page at ``GET /``: one self-contained HTML file, no build step.

It signs in with an API key or a Supabase JWT kept in the browser, and reads
the same API as any client (``/stats``, ``/tasks``, ``/events``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    return resources.files("worker.edge").joinpath("dashboard.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    # The page holds no data and no secrets; the strict policy keeps injected
    # markup from loading or sending anything elsewhere.
    return HTMLResponse(_page(), headers={
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; img-src 'self' data:",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })
