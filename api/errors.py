"""Every failure leaves the API as an OpenAI error object with the matching status."""

from __future__ import annotations

import json

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from broker.errors import HotqError, MethodNotAllowed, RateLimited, RouteNotFound, ServiceUnavailable

log = structlog.get_logger("hotq.api")


def error_response(error: HotqError) -> Response:
    headers = {}
    if isinstance(error, ServiceUnavailable | RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    return Response(
        json.dumps(error.to_openai()), status_code=error.status, headers=headers, media_type="application/json"
    )


def error_event(error: HotqError) -> bytes:
    """The SSE event that ends a stream that already started; the openai client raises APIError."""
    return b"data: " + json.dumps(error.to_openai()).encode() + b"\n\n"


async def on_hotq_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HotqError)
    # One line, no traceback: a refused request is the client's mistake or hotq's state, not a bug.
    log.info("request_refused", path=request.url.path, status=exc.status, code=exc.code or exc.error_type)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method), in OpenAI's format."""
    assert isinstance(exc, HTTPException)
    error: HotqError
    if exc.status_code == 404:
        error = RouteNotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = HotqError(str(exc.detail), status=exc.status_code, error_type="invalid_request_error")
    response = error_response(error)
    if exc.headers:
        response.headers.update(exc.headers)  # e.g. Allow on a 405
    return response


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return error_response(HotqError("internal error in hotq; see the server log"))
