"""The OpenAI-compatible app: `/v1/completions`, `/v1/models` and `/health`, on the leader (and
a router's probes, `api.routing`).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status:
400 invalid (param named), 401 API key, 404 unknown model or route, 408 body stalled, 413 body
too large, 429 queue full, 503 not ready, 504 no token for `stall_timeout`, 500 (no traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from moe_worker.api import auth, routing
from moe_worker.api.body import BODY_DEADLINE, BODY_TIMEOUT, BodyLimit, read_model
from moe_worker.api.completions import Delta, Generation, failure
from moe_worker.api.errors import ApiError, install, openai_body
from moe_worker.api.limits import MAX_PROMPTS, ModelBounds
from moe_worker.api.prompts import Encoder, TokenizerCache, max_tokens_for, prompt_token_ids
from moe_worker.api.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelEntry,
    ModelList,
    Usage,
    dump,
)
from moe_worker.api.text import TextStream
from moe_worker.serving.generation import Backend, GenerationRequest, ModelCard, SamplingParams

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_openai_app(
    backend: Backend,
    *,
    api_keys_path: str | None = None,
    max_body: int = 8 * 1024 * 1024,
    max_prompts: int = MAX_PROMPTS,
    body_timeout: float = BODY_TIMEOUT,
    body_deadline: float = BODY_DEADLINE,
    stall_timeout: float = 600.0,
) -> FastAPI:
    """The OpenAI app of the leader.

    `api_keys_path`: a file of accepted API keys, one per line (None: no authentication; named
    but missing or empty: every request refused). `max_prompts`: prompts in one request.
    `stall_timeout`: seconds without a token (queueing included) after which a request is
    aborted.
    """
    app = FastAPI(title="moe-ep OpenAI API", docs_url=None, redoc_url=None, openapi_url=None)
    install(app, openai_body)
    app.add_middleware(BodyLimit, max_body=max_body, timeout=body_timeout, deadline=body_deadline)
    tokenizers = TokenizerCache()
    encoder = Encoder()
    created = int(time.time())

    @app.get("/health")
    def health() -> Response:
        if not backend.is_ready():
            raise ApiError(503, "the worker group is not ready")
        return JSONResponse({"status": "ok"})

    routing.add_routes(app, backend)

    @app.get("/v1/models")
    def models(request: Request) -> Response:
        auth.require(request, api_keys_path, what="API key", optional=True)
        card = backend.card
        entry = ModelEntry(id=card.name, created=created, max_model_len=card.max_context)
        return JSONResponse(dump(ModelList(data=[entry])))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        auth.require(request, api_keys_path, what="API key", optional=True)
        card = backend.card
        bounds = ModelBounds(max_prompts, card.max_context, card.shape.vocab_size)
        body = await read_model(request, CompletionRequest, context=bounds)
        _check_request(body, card)
        # Loading a tokenizer and encoding text are CPU work: off the event loop (the encoding
        # without the GIL, so that the serving loop goes on).
        tokenizer = await asyncio.to_thread(tokenizers.get, card)
        if body.stops and tokenizer is None:
            raise ApiError(
                400,
                "stop: stop strings need the model's tokenizer.json, which this checkpoint "
                "lacks; use stop_token_ids",
                "stop",
            )
        prompts = await prompt_token_ids(body.prompt, tokenizer, card, encoder)
        head, requests, texts = _prepare(body, card, tokenizer, prompts)
        generation = Generation(backend, requests, texts, stall_timeout=stall_timeout)
        generation.submit()
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _GenerationStream(generation, _events(generation, head, usage))
        try:
            return await _unless_disconnected(request, _complete(generation, head))
        finally:
            generation.close()

    return app


def _check_request(body: CompletionRequest, card: ModelCard) -> None:
    """What needs neither the tokenizer nor the prompts: the model, unsupported parameters."""
    if body.model != card.name:
        raise ApiError(
            404,
            f"model: {body.model!r} does not exist here; this server serves {card.name!r}",
            "model",
            "model_not_found",
        )
    refused = body.unsupported()
    if refused is not None:
        raise ApiError(400, f"{refused[0]}: {refused[1]}", refused[0])


def _prepare(
    body: CompletionRequest, card: ModelCard, tokenizer: Any | None, prompts: list[list[int]]
) -> tuple[dict[str, Any], list[GenerationRequest], list[TextStream | None]]:
    """The response's head, the engine's requests and the choices' text streams for `body`;
    an ApiError naming the field for anything the model cannot run."""
    sampling = _sampling(body, prompts, card)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    requests = [
        GenerationRequest(f"{completion_id}-{i}", tuple(ids), sampling)
        for i, ids in enumerate(prompts)
    ]
    texts = [
        None if tokenizer is None else TextStream(_decoder(tokenizer), body.stops) for _ in prompts
    ]
    head = {"id": completion_id, "created": int(time.time()), "model": card.name}
    return head, requests, texts


def _sampling(body: CompletionRequest, prompts: list[list[int]], card: ModelCard) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=body.seed,
            max_tokens=max_tokens_for(body.max_tokens, prompts, card),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
        )
    except ValueError as error:  # the schema's bounds should have caught it; name the message
        raise ApiError(400, str(error)) from None


def _decoder(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _usage(generation: Generation) -> Usage:
    prompt, completion = generation.usage
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _complete(generation: Generation, head: dict[str, Any]) -> Response:
    # aclosing: leaving the loop early must abort the other choices now, not when GC runs.
    async with contextlib.aclosing(generation.deltas()) as deltas:
        async for delta in deltas:
            error = failure(delta)
            if error is not None:
                raise error
    choices = [
        CompletionChoice(
            index=c.index,
            text=c.text.text if c.text is not None else "",
            token_ids=c.token_ids,
            finish_reason=c.finish_reason,
        )
        for c in generation.choices.values()
    ]
    completion = Completion(**head, choices=choices, usage=_usage(generation))
    return JSONResponse(dump(completion))


async def _events(
    generation: Generation, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per event, then usage if asked, then `[DONE]`. A failure
    after the first byte can no longer change the status: it is sent as an error event."""
    try:
        async with contextlib.aclosing(generation.deltas()) as deltas:
            async for delta in deltas:
                error = failure(delta)
                if error is not None:
                    yield _sse(openai_body(error))
                    break
                yield _sse(dump(_chunk(delta, head)))
            else:
                if include_usage:
                    yield _sse(dump(Completion(**head, choices=[], usage=_usage(generation))))
    except ApiError as error:
        yield _sse(openai_body(error))
    yield "data: [DONE]\n\n"


class _GenerationStream(StreamingResponse):
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


def _chunk(delta: Delta, head: dict[str, Any]) -> Completion:
    choice = CompletionChoice(
        index=delta.choice.index,
        text=delta.text,
        token_ids=list(delta.token_ids),
        finish_reason=delta.finish_reason,
    )
    return Completion(**head, choices=[choice])


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _unless_disconnected(request: Request, work: Any) -> Response:
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
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body is read, so the next ASGI message is the client going away (or, after the
    # response, the server saying so).
    while (await request.receive())["type"] != "http.disconnect":
        pass
