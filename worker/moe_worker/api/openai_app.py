"""The OpenAI-compatible app, on the leader: `/v1/completions` (`completion_route`),
`/v1/chat/completions` (`chat_route`), `/v1/models`, `/tokenize`, `/detokenize`,
`/tokenizer_info` (`tokenize_route`), `/metrics` (vLLM's serving metrics: `serving_metrics`),
`/health` and a router's probes (`/v1/loads`, `/model_info`: `routing`). Every answer carries
`X-Request-Id` (`request_id`).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status:
400 invalid (param named), 401 API key, 404 unknown model or route, 408 body stalled, 413 body
too large, 429 queue full, 503 not ready or draining (before the body is read), 504 no token
for `stall_timeout`, 500 (no traceback).
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api import auth, routing
from moe_worker.api.body import BODY_DEADLINE, BODY_TIMEOUT, BodyLimit, read_model
from moe_worker.api.chat_route import create_chat_completion
from moe_worker.api.chat_schemas import ChatCompletionRequest
from moe_worker.api.chat_template import TemplateCache
from moe_worker.api.completion_route import Routes, create_completion
from moe_worker.api.errors import ApiError, install, openai_body
from moe_worker.api.limits import MAX_PROMPTS
from moe_worker.api.prompts import Encoder, TokenizerCache
from moe_worker.api.request_id import RequestId
from moe_worker.api.schemas import CompletionRequest, ModelEntry, ModelList, dump
from moe_worker.api.serving_metrics import ServingMetrics
from moe_worker.api.tokenize_route import detokenize, tokenize, tokenizer_info
from moe_worker.serving.generation import DRAINING, Backend

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


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
    but missing or empty: every request refused). `max_prompts`: sequences in one request
    (prompts x n). `stall_timeout`: seconds without a token (queueing included) after which a
    request is aborted.
    """
    app = FastAPI(title="moe-ep OpenAI API", docs_url=None, redoc_url=None, openapi_url=None)
    install(app, openai_body)
    app.add_middleware(BodyLimit, max_body=max_body, timeout=body_timeout, deadline=body_deadline)
    app.add_middleware(RequestId)
    routes = Routes(
        backend,
        ServingMetrics(backend),
        stall_timeout,
        max_prompts,
        TokenizerCache(),
        TemplateCache(),
        Encoder(),
    )
    created = int(time.time())

    def authorized(request: Request) -> None:
        auth.require(request, api_keys_path, what="API key", optional=True)

    @app.get("/health")
    def health() -> Response:
        _refuse_while_draining(backend)
        if not backend.is_ready():
            raise ApiError(503, "the worker group is not ready")
        return JSONResponse({"status": "ok"})

    routing.add_routes(app, backend)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(routes.metrics.exposition(), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/models")
    def models(request: Request) -> Response:
        authorized(request)
        card = backend.card
        entry = ModelEntry(id=card.name, created=created, max_model_len=card.max_context)
        return JSONResponse(dump(ModelList(data=[entry])))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorized(request)
        _refuse_while_draining(backend)  # before the body is read: a router retries elsewhere
        return await create_completion(
            routes, request, await read_model(request, CompletionRequest, context=routes.bounds())
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorized(request)
        _refuse_while_draining(backend)
        body = await read_model(request, ChatCompletionRequest, context=routes.bounds())
        return await create_chat_completion(routes, request, body)

    @app.post("/tokenize")
    async def tokenize_text(request: Request) -> Response:
        authorized(request)
        return await tokenize(routes, request)

    @app.post("/detokenize")
    async def detokenize_tokens(request: Request) -> Response:
        authorized(request)
        return await detokenize(routes, request)

    @app.get("/tokenizer_info")
    async def tokenizer_information(request: Request) -> Response:
        authorized(request)
        return await tokenizer_info(routes)

    return app


def _refuse_while_draining(backend: Backend) -> None:
    if backend.drain_state().draining:
        raise ApiError(503, DRAINING)
