"""Request bodies read under a size limit and a deadline, whatever the client claims.

`BodyLimit` wraps an app's ASGI `receive`: a body whose Content-Length says it is over the limit
is refused before a byte of it is read, a body that grows past the limit (chunked, or a lying
Content-Length) is refused at the first chunk over it, and a body that stops arriving for
`timeout` seconds, or is not complete `deadline` seconds after its head (one byte every few
seconds), is refused instead of holding the request. Each refusal is an `ApiError`
raised from `receive`, so the app answers it in its own error shape; the connection is then
closed (`Connection: close`: else uvicorn would read and drop the rest of the body for as long
as the client sends it), the rest of the body unread. Malformed Content-Length values (`-1`, `abc`)
never reach the app: the HTTP parser (h11) answers them 400 itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_worker.api.errors import ApiError, from_validation

M = TypeVar("M", bound=BaseModel)

BODY_TIMEOUT = 30.0
"""Seconds a body may go without a byte."""
BODY_DEADLINE = 60.0
"""Seconds a whole body may take after its head (8 MiB at about 1 Mbit/s)."""
CLOSE = {"Connection": "close"}


class BodyLimit:
    """ASGI middleware: at most `max_body` bytes per request body, each chunk within `timeout`,
    the whole body within `deadline` seconds of the request's head."""

    def __init__(
        self, app: ASGIApp, max_body: int, timeout: float, deadline: float = BODY_DEADLINE
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.timeout = timeout
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limited = _LimitedReceive(scope, receive, self.max_body, self.timeout, self.deadline)
        await self.app(scope, limited, send)


class _LimitedReceive:
    def __init__(
        self, scope: Scope, receive: Receive, max_body: int, timeout: float, deadline: float
    ) -> None:
        self.receive = receive
        self.max_body = max_body
        self.timeout = timeout
        self.deadline = deadline
        self.due = time.monotonic() + deadline
        self.declared = _content_length(scope)
        self.read = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:  # the body is in; what follows is the disconnect a stream listens for
            return await self.receive()
        if self.declared is not None and self.declared > self.max_body:
            raise _too_large(self.max_body)
        left = self.due - time.monotonic()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, min(self.timeout, left)))
        except TimeoutError:
            if left <= self.timeout:
                raise ApiError(
                    408,
                    f"request body not complete {self.deadline:g} s after its head",
                    headers=CLOSE,
                ) from None
            raise ApiError(
                408,
                f"request body incomplete after {self.timeout:g} s (Content-Length lies?)",
                headers=CLOSE,
            ) from None
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            if self.read > self.max_body:
                raise _too_large(self.max_body)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before the app sees them
    return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over the limit of {limit} bytes", headers=CLOSE)


async def read_json(request: Request) -> Any:
    """The body as JSON (under the app's BodyLimit); a 400 when it is not JSON."""
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as error:
        raise ApiError(400, f"body is not valid JSON: {error}") from None


async def read_model(request: Request, model: type[M], context: Any = None) -> M:
    """The body parsed into `model` (`context`: its validators' context); a 400 naming the first
    invalid field."""
    body = await request.body()
    try:
        return model.model_validate_json(body, context=context)
    except ValidationError as error:
        raise from_validation(error) from None
