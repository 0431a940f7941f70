"""Every error leaves the API as the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fanline.shared.connections import UNAVAILABLE
from fanline.shared.errors import FanlineError, InvalidRequest, NotFound, RateLimited, Unauthorized, Unavailable

log = logging.getLogger("fanline.api")


def error_response(exc: FanlineError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    if exc.headers:
        headers = {**(headers or {}), **exc.headers}
    if isinstance(exc, RateLimited):
        headers = {**(headers or {}), "Retry-After": str(exc.retry_after)}
    elif isinstance(exc, Unauthorized):  # RFC 6750: a 401 names the scheme it wants
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="fanline"'}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def redis_unavailable(path: str, exc: Exception) -> JSONResponse:
    log.warning("redis error on %s: %s", path, exc)
    return error_response(Unavailable("Redis is unavailable; retry shortly", code="redis_unavailable"))


def internal_error(path: str) -> JSONResponse:
    """Call from an ``except`` block: the exception is logged with its traceback."""
    log.exception("unexpected error on %s", path)
    return error_response(FanlineError("internal error; it has been logged"))


def install(app: FastAPI) -> None:
    @app.exception_handler(FanlineError)
    async def fanline_error(request: Request, exc: FanlineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        return error_response(InvalidRequest(f"{param}: {first['msg']}", code="invalid_value", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        error = FanlineError(str(exc.detail), code=f"http_{exc.status_code}")
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error, headers=exc.headers)

    async def redis_error(request: Request, exc: Exception) -> JSONResponse:
        return redis_unavailable(request.url.path, exc)

    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, redis_error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.url.path)
