"""`X-Request-Id`: the client's (or one made here) is echoed on the answer and names the request
in the log: one line when it ends, with its method, path, status and duration, and the
generation's own lines (`request_id(request)`)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
"""What a client's id may be (printable, bounded): anything else is replaced, never logged."""

log = logging.getLogger("moe_worker.api")


class RequestId:
    """ASGI middleware: every HTTP answer carries `X-Request-Id`; the scope's state holds it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        rid = given if _VALID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start, status = time.monotonic(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "request %s: %s %s %s in %.3f s",
                rid,
                scope["method"],
                scope["path"],
                status or "(no answer)",
                time.monotonic() - start,
            )


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))
