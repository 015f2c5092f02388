"""One error envelope everywhere: `{"error": {"code", "message", "param"}}` with the right status."""

from __future__ import annotations

import json
import math
import logging

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.errors import (
    CineVividError, InsufficientStorage, StorageUnavailable, is_disk_full, is_storage_unwritable, unwrap_error,
)

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "permission_denied", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
               416: "range_not_satisfiable", 422: "validation_error", 429: "rate_limit_exceeded", 507: "insufficient_storage",
               503: "service_unavailable"}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param}}, status_code=status,
                        headers=headers)


def validation_error_response(exc: ValidationError, prefix: str = "") -> JSONResponse:
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__") or None
    if prefix and param:
        param = f"{prefix}.{param}"
    msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return error_response(422, "validation_error", msg, param)


async def handle_cinevivid_error(request: Request, exc: Exception) -> JSONResponse:
    err = unwrap_error(exc)
    if not isinstance(err, CineVividError):
        return await handle_unexpected(request, exc)
    headers = None
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
    if err.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return error_response(err.status, err.code, err.message, err.param, headers)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, None, dict(exc.headers or {}) or None)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return validation_error_response(exc)


async def handle_storage_error(request: Request, exc: Exception) -> JSONResponse:
    """A file or database error: a full disk or quota (ENOSPC, EDQUOT) is a 507 insufficient_storage,
    storage that cannot be written (EACCES, EPERM, EROFS) a 503 storage_unavailable, a database too
    busy to take the write a 503 database_busy, each saying so; anything else a 500."""
    if "database is locked" in str(exc):
        logger.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "database_busy", "the job database is busy; nothing was saved. Try again.",
                              headers={"Retry-After": "2"})
    if is_disk_full(exc):  # ENOSPC, EDQUOT
        logger.error("disk full on %s %s: %s", request.method, request.url.path, exc)
        return error_response(InsufficientStorage.status, InsufficientStorage.code,
                              "the server's storage is full; nothing was saved. Try again later.",
                              headers={"Retry-After": "60"})
    if is_storage_unwritable(exc):  # EACCES, EPERM, EROFS
        logger.error("storage not writable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(StorageUnavailable.status, StorageUnavailable.code,
                              "the server cannot write to its storage right now; nothing was saved. "
                              "Try again later.", headers={"Retry-After": "30"})
    return await handle_unexpected(request, exc)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    err = unwrap_error(exc)
    if isinstance(err, CineVividError):  # a typed error from a deployment, wrapped by Ray
        return await handle_cinevivid_error(request, err)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {
    CineVividError: handle_cinevivid_error,
    HTTPException: handle_http_exception,
    ValidationError: handle_validation_error,
    OSError: handle_storage_error,
    DBAPIError: handle_storage_error,
    Exception: handle_unexpected,
}
