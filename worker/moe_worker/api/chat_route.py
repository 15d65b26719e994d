"""`POST /v1/chat/completions`: messages rendered with the checkpoint's chat template
(`chat_template`), tokenized without added special tokens, generated as completions are, and
answered in the chat shapes: the message, or a stream whose first chunk per choice carries the
role, then the text as it comes, the finish reason, and usage when asked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api.chat_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
)
from moe_worker.api.chat_template import TemplateRefused
from moe_worker.api.completion_route import (
    Routes,
    check_choices,
    choice_requests,
    sampling_params,
    text_streams,
)
from moe_worker.api.completions import Delta as GenerationDelta
from moe_worker.api.completions import Generation, failure
from moe_worker.api.errors import ApiError, openai_body
from moe_worker.api.logprobs import TokenTexts, chat_logprobs
from moe_worker.api.prompts import check_text_size, check_tokens, max_tokens_for
from moe_worker.api.request_id import request_id
from moe_worker.api.schemas import StreamOptions, Usage, dump
from moe_worker.api.streaming import DONE, respond, sse, usage
from moe_worker.serving.generation import ModelCard

log = logging.getLogger("moe_worker.api")

NO_TEMPLATE = (
    "messages: this model has no chat template (its checkpoint ships neither a chat_template "
    "in tokenizer_config.json nor chat_template.jinja); start the server with "
    "--chat-template FILE, or send the formatted prompt to /v1/completions"
)


@dataclass
class _Plan:
    head: dict[str, Any]
    n: int
    logprobs: bool
    texts: TokenTexts


async def create_chat_completion(
    routes: Routes, request: Request, body: ChatCompletionRequest
) -> Response:
    card = routes.check_model(body.model)
    tokenizer = await asyncio.to_thread(routes.tokenizers.get, card)
    prompt = await render_prompt(routes, body, card, tokenizer)
    n = body.n or 1
    check_choices(1, n, routes.max_prompts)
    top = body.top_logprobs or 0
    sampling = sampling_params(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        max_tokens=max_tokens_for(body.completion_tokens, [prompt], card),
        stop_token_ids=tuple(body.stop_token_ids or ()),  # bounded and checked when parsed
        ignore_eos=bool(body.ignore_eos),
        logprobs=top if body.logprobs else None,
    )
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = choice_requests(chat_id, [prompt], sampling, n)
    generation = Generation(
        routes.backend,
        requests,
        text_streams(tokenizer, body.stops, len(requests)),
        stall_timeout=routes.stall_timeout,
        observer=routes.metrics,
    )
    plan = _Plan(
        {"id": chat_id, "created": int(time.time()), "model": card.name},
        n,
        bool(body.logprobs),
        TokenTexts(tokenizer),
    )
    log.info("request %s: %s, %d choices", request_id(request), chat_id, len(requests))
    options = body.stream_options or StreamOptions()
    events = (lambda: _events(generation, plan, options)) if body.stream else None
    return await respond(request, generation, events, lambda: _complete(generation, plan))


async def render_prompt(
    routes: Routes, body: ChatCompletionRequest, card: ModelCard, tokenizer: Any | None
) -> list[int]:
    """The conversation as checked token ids (the template writes the special tokens); a 400
    naming what is wrong. Rendered on a thread, bounded, then encoded as prompts are (on the
    encoder's thread without the GIL: `api.prompts`)."""
    text = await asyncio.to_thread(render_text, routes, body, card, tokenizer)
    check_text_size(text, card, "messages")
    ids = await routes.encoder.encode(tokenizer, text, special_tokens=False)
    check_tokens(ids, card, where="messages", field="messages")
    return ids


def render_text(
    routes: Routes, body: ChatCompletionRequest, card: ModelCard, tokenizer: Any | None
) -> str:
    """The conversation as the model's prompt text."""
    refused = body.unsupported()
    if refused is not None:
        raise ApiError(400, f"{refused[0]}: {refused[1]}", refused[0])
    if tokenizer is None:
        raise ApiError(
            400,
            "messages: chat needs the model's tokenizer.json, which this checkpoint lacks; "
            "send token ids to /v1/completions",
            "messages",
        )
    template = routes.templates.get(card)
    if template is None:
        raise ApiError(400, NO_TEMPLATE, "messages")
    messages = [_message(i, m) for i, m in enumerate(body.messages)]
    try:
        text = template.render(
            messages,
            add_generation_prompt=bool(body.add_generation_prompt),
            **(body.chat_template_kwargs or {}),
        )
    except TemplateRefused as refusal:
        raise ApiError(
            400, f"messages: the model's chat template refused them: {refusal}", "messages"
        ) from None
    if body.continue_final_message:
        text = _up_to_final_message(text, messages[-1])
    return text


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as transformers hands it to a template: text parts joined by newlines."""
    raw = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        parts = []
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise ApiError(
                    400,
                    f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                    "messages",
                )
            parts.append(part.text)
        raw["content"] = "\n".join(parts)
    elif message.content is None:
        raw["content"] = ""
    return raw


def _up_to_final_message(text: str, final: dict[str, Any]) -> str:
    """The rendered text cut right after the final message's content (the model continues it,
    transformers' `continue_final_message`)."""
    content = str(final.get("content", "")).strip()
    end = text.rfind(content) if content else -1
    if end < 0:
        raise ApiError(
            400,
            "continue_final_message: the final message's content is not in the rendered prompt",
            "continue_final_message",
        )
    return text[: end + len(content)]


def _logprobs(plan: _Plan, tokens: Any, entries: Any) -> ChoiceLogprobs | None:
    if not plan.logprobs:
        return None
    return ChoiceLogprobs(content=chat_logprobs(tokens, entries, plan.texts))


async def _complete(generation: Generation, plan: _Plan) -> Response:
    async with contextlib.aclosing(generation.deltas()) as deltas:
        async for delta in deltas:
            error = failure(delta)
            if error is not None:
                raise error
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text.text if c.text is not None else ""),
            logprobs=_logprobs(plan, c.token_ids, c.logprobs),
            finish_reason=c.finish_reason,
            token_ids=c.token_ids,
        )
        for c in generation.choices.values()
    ]
    answer = ChatCompletion(**plan.head, choices=choices, usage=usage(generation, plan.n))
    return JSONResponse(dump(answer))


def _chunk(plan: _Plan, choice: ChunkChoice, totals: Usage | None = None) -> str:
    return sse(dump(ChatCompletionChunk(**plan.head, choices=[choice], usage=totals)))


def _content(plan: _Plan, delta: GenerationDelta) -> ChunkChoice:
    return ChunkChoice(
        index=delta.choice.index,
        delta=Delta(content=delta.text) if delta.text else Delta(),
        logprobs=_logprobs(plan, delta.token_ids, delta.logprobs),
        finish_reason=delta.finish_reason,
        token_ids=list(delta.token_ids),
    )


async def _events(
    generation: Generation, plan: _Plan, options: StreamOptions
) -> AsyncIterator[str]:
    """Each choice's role first, then its text as it comes; usage; `[DONE]`. A failure after
    the first byte is sent as an error event."""
    for choice in generation.choices.values():
        yield _chunk(
            plan, ChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""))
        )
    try:
        async with contextlib.aclosing(generation.deltas()) as deltas:
            async for delta in deltas:
                error = failure(delta)
                if error is not None:
                    yield sse(openai_body(error))
                    break
                running = usage(generation, plan.n) if options.every_chunk() else None
                yield _chunk(plan, _content(plan, delta), running)
            else:
                if options.include_usage:
                    totals = usage(generation, plan.n)
                    yield sse(dump(ChatCompletionChunk(**plan.head, choices=[], usage=totals)))
    except ApiError as error:
        yield sse(openai_body(error))
    yield DONE
