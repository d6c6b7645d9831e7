"""The demo: a simulated remote API and a varied set of sample tasks against it.

The simulated remote is stateless: each job's start time and length travel in
its status URL, so it survives restarts and needs no storage. `taskman dev`
mounts it on the edge under ``/demo/remote``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, RedirectResponse

REMOTE_PREFIX = "/demo/remote"

remote = APIRouter(prefix=REMOTE_PREFIX, include_in_schema=False)


def _elapsed(started: float) -> float:
    return max(0.0, time.time() - started)


@remote.get("/jobs/{name}")
def job_status(name: str, started: float = Query(...), seconds: float = Query(0, ge=0)) -> Any:
    """A job in the generic profile's shape: running with progress until ``seconds`` pass."""
    elapsed = _elapsed(started)
    if name == "fails":
        return {"status": "failed",
                "error": {"message": "simulated: the render farm ran out of disk"}}
    if name == "flaky" and elapsed < seconds:
        return JSONResponse({"detail": "simulated outage"}, status_code=503)
    if name == "never" or elapsed < seconds:
        progress = 0 if name == "never" else int(100 * elapsed / seconds)
        return {"status": "running", "progress": progress,
                "progress_message": f"step {progress // 20 + 1} of 5"}
    return {"status": "completed",
            "result": {"job": name, "url": f"https://files.example.com/{name}.csv",
                       "took_seconds": round(elapsed, 1)}}


@remote.get("/celery/{task_id}")
def celery_status(
    task_id: str, started: float = Query(...), seconds: float = Query(0, ge=0)
) -> Any:
    """A Celery-style status endpoint (the ``celery`` profile)."""
    if _elapsed(started) < seconds:
        return {"task_id": task_id, "status": "STARTED", "result": None}
    return {"task_id": task_id, "status": "SUCCESS", "result": {"rows": 1284}}


@remote.get("/async/{job}")
def async_status(job: str, started: float = Query(...), seconds: float = Query(0, ge=0)) -> Any:
    """The async request-reply pattern (the ``http`` profile): 202 then 303 to the result."""
    if _elapsed(started) < seconds:
        return JSONResponse({"progress": int(100 * _elapsed(started) / seconds)},
                            status_code=202, headers={"Retry-After": "2"})
    return RedirectResponse(f"{REMOTE_PREFIX}/async/{job}/result", status_code=303)


@remote.get("/async/{job}/result")
def async_result(job: str) -> dict[str, Any]:
    return {"job": job, "pages": 42}


def sample_tasks(remote_url: str, now: float | None = None) -> list[dict[str, Any]]:
    """``create_task`` arguments for a varied demo: fast, slow with progress, flaky,
    failing, timing out, Celery, async request-reply, and one awaiting a callback."""
    t = time.time() if now is None else now

    def job(path: str, seconds: float = 0) -> str:
        return f"{remote_url}{path}?started={t:.0f}&seconds={seconds:g}"

    demo = {"demo": True}
    return [
        {"poll_url": job("/jobs/thumbnail"), "task_type": "thumbnail", "metadata": demo},
        {"poll_url": job("/jobs/quarterly-report", 45), "task_type": "report",
         "poll_interval_seconds": 3, "metadata": demo},
        {"poll_url": job("/jobs/model-training", 90), "task_type": "ml_training",
         "poll_interval_seconds": 5, "metadata": demo},
        {"poll_url": job("/jobs/flaky", 12), "task_type": "data_import",
         "poll_interval_seconds": 2, "metadata": demo},
        {"poll_url": job("/jobs/fails"), "task_type": "render", "metadata": demo},
        {"poll_url": job("/jobs/never"), "task_type": "data_pipeline", "timeout_minutes": 1,
         "poll_interval_seconds": 5, "metadata": demo},
        {"poll_url": job("/celery/c0ffee", 20), "task_type": "celery",
         "poll_interval_seconds": 3, "metadata": demo},
        {"poll_url": job("/async/pdf-export", 15), "task_type": "pdf_export",
         "poll_config": {"profile": "http"}, "poll_interval_seconds": 2, "metadata": demo},
        {"task_type": "manual_review", "external_id": "awaiting-callback", "metadata": demo},
    ]
