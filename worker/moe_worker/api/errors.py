"""Errors of the HTTP layer and the two bodies they are answered with.

One exception, `ApiError`, carries status, message and the offending parameter; each app turns it
into its own body: OpenAI's `{"error": {"message", "type", "param", "code"}}` on the OpenAI app,
and the operator's `{"error": message, "field": name}` on the control app (docs/worker.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api.limits import RULE

log = logging.getLogger("moe_worker.api")

# OpenAI's error `type` per status (the official client raises a class per status, not per type).
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    429: "queue_full",
    500: "internal_error",
    503: "not_ready",
    504: "timeout",
}


class ApiError(Exception):
    """A request answered with an error status; `param` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}
        """More keys of the control app's body (`leaderRank`); the OpenAI shape has no room."""


def openai_body(error: ApiError) -> dict[str, Any]:
    code = error.code or _CODES.get(error.status, "invalid_request")
    kind = _TYPES.get(
        error.status, "server_error" if error.status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}


def control_body(error: ApiError) -> dict[str, Any]:
    return {"error": error.message, "field": error.param, **error.extra}


def from_validation(error: ValidationError | RequestValidationError, *, skip: int = 0) -> ApiError:
    """A 400 naming the first invalid field: `max_tokens`, `stream_options.include_usage`.

    `skip` drops leading location parts that are not fields (FastAPI's "body", "query").
    Union branches and list indices are dropped too: a client knows `prompt`, not `list[int]`.
    """
    errors = list(error.errors())
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param = _field_path([str(part) for part in first["loc"][skip:]])
    if param is None:
        return ApiError(400, f"body: {first['msg']}")
    if first["type"] == RULE:  # our own checks name the location themselves (`prompt[3]: ...`)
        return ApiError(400, first["msg"], param=param)
    return ApiError(400, f"{param}: {first['msg']}", param=param)


def _field_path(parts: list[str]) -> str | None:
    if not parts:
        return None
    # Nested models keep their field names; pydantic's union tags ("list[int]") and indices go.
    fields = [parts[0]]
    fields += [p for p in parts[1:] if p.isidentifier() and "[" not in p and p not in _UNION_TAGS]
    return ".".join(fields)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def install(app: FastAPI, body: Callable[[ApiError], dict[str, Any]]) -> None:
    """Answer every error of `app` with `body`: ours, FastAPI's 422s (as 400s), unknown routes
    and methods, and anything unexpected (a 500 whose body says nothing of the traceback)."""

    async def api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return JSONResponse(body(error), status_code=error.status, headers=error.headers)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return await api_error(request, ApiError(error.status_code, message))

    async def invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return await api_error(request, from_validation(error, skip=1))

    async def unexpected(request: Request, error: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return await api_error(request, ApiError(500, "internal error; see the worker's log"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
