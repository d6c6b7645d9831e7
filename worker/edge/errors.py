"""Every error the edge answers, as ``{"error": {"code", "message"}}`` with the right status.

Database errors keep the SQLSTATE-to-status mapping PostgREST uses for Taskman's
functions. A body that cannot be parsed (not JSON, not UTF-8) is 400; invalid values
are always 422 (FastAPI's convention), whether pydantic or the database caught them.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code and a sentence for a person."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


# Exact SQLSTATEs first, then whole classes (the first two characters).
_SQLSTATES: dict[str, tuple[int, str]] = {
    "PT404": (404, "not_found"),
    "PT403": (403, "forbidden"),
    "PT409": (409, "conflict"),
    "42501": (403, "forbidden"),
    "23505": (409, "conflict"),
    "23514": (422, "invalid_argument"),
    "23502": (422, "invalid_argument"),
    # Writes refused (a Supabase project turned read-only when its disk is full).
    "25006": (503, "database_read_only"),
}
_SQLSTATE_CLASSES: dict[str, tuple[int, str]] = {
    "22": (422, "invalid_argument"),  # data exceptions: bad values, out of range, bad JSON
    "54": (422, "invalid_argument"),  # program limits: a value too large or too deep
    "08": (503, "database_unavailable"),  # connection exceptions
    "40": (503, "database_busy"),  # serialization failure, deadlock: safe to retry
    "57": (503, "database_unavailable"),  # shutdown, statement timeout
    "53": (503, "database_unavailable"),  # insufficient resources: disk full, out of memory
}

ERROR_STATUSES = {
    400: "The request body could not be parsed.",
    401: "No credentials, or credentials that are not valid.",
    403: "The caller may not do this.",
    404: "No such task, or not the caller's.",
    409: "The task's state does not allow this.",
    413: "The request body is too large.",
    422: "Invalid input; the message names the field.",
    429: "Too many open event streams; retry after Retry-After seconds.",
    503: "The database or Supabase Auth's signing keys (JWKS) are unavailable; retry later.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(code=code, message=message, field=field)).model_dump(
        exclude_none=True
    )


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status,
                        headers=exc.headers)


def database_error(exc: psycopg.Error) -> ApiError:
    """The answer for an error raised by the database or the driver."""
    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
        return ApiError(503, "database_unavailable", "The database is unavailable; retry later.")
    state = exc.sqlstate or ""
    status, code = _SQLSTATES.get(state) or _SQLSTATE_CLASSES.get(state[:2], (0, ""))
    if not status:
        if isinstance(exc, psycopg.DataError):  # refused by the driver, e.g. a NUL character
            status, code = 422, "invalid_argument"
        else:
            log.error("unexpected database error %s", state, exc_info=exc)
            return ApiError(500, "internal_error", "An unexpected error occurred.")
    diag = exc.diag
    message = diag.message_primary or str(exc)
    if diag.message_hint:
        message = f"{message}. {diag.message_hint}"
    return ApiError(status, code, message, diag.column_name)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(location) or None
    message = first.get("msg", "invalid input")
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_body", f"The body is not valid JSON: {message}")
    return ApiError(422, "invalid_argument", f"{field}: {message}" if field else message, field)


_HTTP_CODES = {
    400: "invalid_body",  # FastAPI's only 400: a body it cannot decode
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to a JSON error answer; unexpected ones are logged as 500."""

    # Starlette calls each handler only with its exception class, but types them all as
    # taking any Exception: hence the asserts.
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, psycopg.Error)
        return error_response(database_error(exc))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "error")
        response = error_response(ApiError(exc.status_code, code, str(exc.detail)))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal_error", "An unexpected error occurred."))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(psycopg.Error, on_database_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
