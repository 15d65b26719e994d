"""What both generation routes share: server-sent events of a generation, usage, and answering
only while the client is still there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from moe_worker.api.completions import Generation
from moe_worker.api.schemas import Usage

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerationStream(StreamingResponse):
    """Server-sent events of a generation that is aborted however the response ends, even
    when the client left before the first event (the event generator never ran)."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def usage(generation: Generation, choices_per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (its `n` choices share it), completion tokens of all."""
    choices = list(generation.choices.values())
    prompt = sum(c.prompt_tokens for c in choices if c.index % choices_per_prompt == 0)
    completion = sum(len(c.token_ids) for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def respond(
    request: Request,
    generation: Generation,
    events: Callable[[], AsyncIterator[str]] | None,
    complete: Callable[[], Awaitable[Response]],
) -> Response:
    """Submit `generation` and answer: a stream of its `events` (when given), or the whole
    answer, aborted if the client goes away; the generation is closed either way."""
    generation.submit()
    if events is not None:
        return GenerationStream(generation, events())
    try:
        return await unless_disconnected(request, complete())
    finally:
        generation.close()


async def unless_disconnected(request: Request, work: Any) -> Response:
    """Await `work`, unless the client goes away first: then cancel it (which aborts the
    generation) rather than compute an answer nobody reads."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return task.result()  # type: ignore[no-any-return]


async def _disconnected(request: Request) -> None:
    # The body is read, so the next ASGI message is the client going away (or, after the
    # response, the server saying so).
    while (await request.receive())["type"] != "http.disconnect":
        pass
