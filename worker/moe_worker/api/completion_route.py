"""`POST /v1/completions`: prompts in, choices out, streamed or not; `n` choices per prompt
sharing its prefill, `echo`, and log-probabilities in OpenAI's legacy shape."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api.chat_template import TemplateCache
from moe_worker.api.completions import ChoiceState, Delta, Generation, failure
from moe_worker.api.errors import ApiError, openai_body
from moe_worker.api.limits import ModelBounds
from moe_worker.api.logprobs import TokenTexts, completion_logprobs, extend
from moe_worker.api.prompts import Encoder, TokenizerCache, max_tokens_for, prompt_token_ids
from moe_worker.api.request_id import request_id
from moe_worker.api.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    StreamOptions,
    dump,
)
from moe_worker.api.serving_metrics import ServingMetrics
from moe_worker.api.streaming import DONE, respond, sse, usage
from moe_worker.api.text import TextStream
from moe_worker.serving.generation import Backend, GenerationRequest, ModelCard, SamplingParams

log = logging.getLogger("moe_worker.api")
INT64 = 2**63


@dataclass
class Routes:
    """What the generation routes share: the backend, loaded tokenizer and template, limits."""

    backend: Backend
    metrics: ServingMetrics
    stall_timeout: float
    max_prompts: int
    tokenizers: TokenizerCache
    templates: TemplateCache
    encoder: Encoder

    def bounds(self) -> ModelBounds:
        """What a request body is checked against while it is parsed (`api.limits`)."""
        card = self.backend.card
        return ModelBounds(self.max_prompts, card.max_context, card.shape.vocab_size)

    def check_model(self, model: str) -> ModelCard:
        card = self.backend.card
        if model != card.name:
            raise ApiError(
                404,
                f"model: {model!r} does not exist here; this server serves {card.name!r}",
                "model",
                "model_not_found",
            )
        return card


def choice_requests(
    completion_id: str, prompts: list[list[int]], sampling: SamplingParams, n: int
) -> list[GenerationRequest]:
    """`n` requests per prompt, choice index prompt x n + j; a prompt's later choices copy
    its first one's prefill; with a seed, choice j draws from seed + j."""
    requests = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            seed = sampling.seed
            if seed is not None:
                seed = (seed + j + INT64) % (2 * INT64) - INT64
            requests.append(
                GenerationRequest(
                    f"{completion_id}-{p * n + j}",
                    tuple(ids),
                    dataclasses.replace(sampling, seed=seed),
                    prefill_from=f"{completion_id}-{p * n}" if j else None,
                )
            )
    return requests


def sampling_params(**fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as error:  # the schema's bounds should have caught it; name the message
        raise ApiError(400, str(error)) from None


def text_streams(tokenizer: Any | None, stops: tuple[str, ...], count: int) -> list[Any]:
    if tokenizer is None:
        return [None] * count
    return [TextStream(decoder(tokenizer), stops) for _ in range(count)]


def decoder(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def check_choices(prompts: int, n: int, max_prompts: int) -> None:
    if prompts * n > max_prompts:
        raise ApiError(
            400,
            f"n: {prompts} prompts x {n} choices is more than {max_prompts} sequences per request",
            "n",
        )


async def create_completion(routes: Routes, request: Request, body: CompletionRequest) -> Response:
    card = routes.check_model(body.model)
    # Loading a tokenizer and encoding text are CPU work: off the event loop (the encoding
    # without the GIL, so that the serving loop goes on).
    tokenizer = await asyncio.to_thread(routes.tokenizers.get, card)
    _check_request(body, tokenizer)
    prompts = await prompt_token_ids(body.prompt, tokenizer, card, routes.encoder)
    plan = await asyncio.to_thread(_plan, routes, body, card, tokenizer, prompts)
    generation = Generation(
        routes.backend,
        plan.requests,
        text_streams(tokenizer, body.stops, len(plan.requests)),
        stall_timeout=routes.stall_timeout,
        limit=0 if body.max_tokens == 0 else None,
        observer=routes.metrics,
    )
    log.info(
        "request %s: %s, %d choices, user %r",
        request_id(request),
        plan.head["id"],
        len(plan.requests),
        body.user,
    )
    options = body.stream_options or StreamOptions()
    events = (lambda: _events(generation, plan, options)) if body.stream else None
    return await respond(request, generation, events, lambda: _complete(generation, plan))


@dataclass
class _Plan:
    """One request's choices, and how to answer them."""

    head: dict[str, Any]
    requests: list[GenerationRequest]
    n: int
    echo: list[str]
    """Each prompt's text, sent before its choices' text with `echo` ([] without)."""
    logprobs: int | None
    texts: TokenTexts
    prompt_chars: list[int]
    """Each prompt's text length: where a choice's text offsets start without echo."""


def _check_request(body: CompletionRequest, tokenizer: Any | None) -> None:
    """What needs no prompt: parameters refused, stop strings without a tokenizer."""
    refused = body.unsupported()
    if refused is not None:
        raise ApiError(400, f"{refused[0]}: {refused[1]}", refused[0])
    if body.stops and tokenizer is None:
        raise ApiError(
            400,
            "stop: stop strings need the model's tokenizer.json, which this checkpoint lacks; "
            "use stop_token_ids",
            "stop",
        )


def _plan(
    routes: Routes,
    body: CompletionRequest,
    card: ModelCard,
    tokenizer: Any | None,
    prompts: list[list[int]],
) -> _Plan:
    n = body.n or 1
    check_choices(len(prompts), n, routes.max_prompts)
    asked = 1 if body.max_tokens == 0 else body.max_tokens  # 0: score the prompt, drop the token
    sampling = sampling_params(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        max_tokens=max_tokens_for(asked, prompts, card),
        stop_token_ids=tuple(body.stop_token_ids or ()),  # bounded and checked when parsed
        ignore_eos=bool(body.ignore_eos),
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    texts = [_prompt_text(body.prompt, i, ids, tokenizer) for i, ids in enumerate(prompts)]
    return _Plan(
        head={"id": completion_id, "created": int(time.time()), "model": card.name},
        requests=choice_requests(completion_id, prompts, sampling, n),
        n=n,
        echo=texts if body.echo else [],
        logprobs=body.logprobs,
        texts=TokenTexts(tokenizer),
        prompt_chars=[len(text) for text in texts],
    )


def _prompt_text(prompt: Any, index: int, ids: list[int], tokenizer: Any | None) -> str:
    """The prompt as text: as sent, or its token ids decoded ("" without a tokenizer)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[index], str):
        return str(prompt[index])
    return "" if tokenizer is None else decoder(tokenizer)(ids)


class _ChoiceLogprobs:
    """A choice's legacy log-probabilities as they grow (the prompt's first, with echo)."""

    def __init__(self, plan: _Plan, choice: ChoiceState) -> None:
        self.plan, self.choice = plan, choice
        prompt = plan.requests[choice.index].prompt_token_ids
        self.offset = 0 if plan.echo else plan.prompt_chars[choice.index // plan.n]
        self.prompt = prompt

    def take(self, delta: Delta) -> CompletionLogprobs | None:
        if self.plan.logprobs is None:
            return None
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        if delta.first and self.plan.echo:
            entries = self.choice.prompt_logprobs or (None,) * len(self.prompt)
            extend(out, self._shape(self.prompt, list(entries)))
        if delta.logprobs:
            extend(out, self._shape(delta.token_ids, list(delta.logprobs)))
        return out

    def _shape(self, tokens: Any, entries: list[Any]) -> CompletionLogprobs:
        shaped, self.offset = completion_logprobs(tokens, entries, self.plan.texts, self.offset)
        return shaped


async def _complete(generation: Generation, plan: _Plan) -> Response:
    # aclosing: leaving the loop early must abort the other choices now, not when GC runs.
    logprobs = {c.index: _ChoiceLogprobs(plan, c) for c in generation.choices.values()}
    gathered: dict[int, CompletionLogprobs] = {}
    async with contextlib.aclosing(generation.deltas()) as deltas:
        async for delta in deltas:
            error = failure(delta)
            if error is not None:
                raise error
            more = logprobs[delta.choice.index].take(delta)
            if more is not None:
                extend(gathered.setdefault(delta.choice.index, _empty()), more)
    choices = [
        CompletionChoice(
            index=c.index,
            text=_echo(plan, c) + (c.text.text if c.text is not None else ""),
            token_ids=c.token_ids,
            logprobs=gathered.get(c.index, _empty()) if plan.logprobs is not None else None,
            finish_reason=c.finish_reason,
        )
        for c in generation.choices.values()
    ]
    completion = Completion(**plan.head, choices=choices, usage=usage(generation, plan.n))
    return JSONResponse(dump(completion))


def _empty() -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


def _echo(plan: _Plan, choice: ChoiceState) -> str:
    return plan.echo[choice.index // plan.n] if plan.echo else ""


async def _events(
    generation: Generation, plan: _Plan, options: StreamOptions
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per event, then usage if asked, then `[DONE]`. A failure
    after the first byte can no longer change the status: it is sent as an error event."""
    logprobs = {c.index: _ChoiceLogprobs(plan, c) for c in generation.choices.values()}
    try:
        async with contextlib.aclosing(generation.deltas()) as deltas:
            async for delta in deltas:
                error = failure(delta)
                if error is not None:
                    yield sse(openai_body(error))
                    break
                choice = CompletionChoice(
                    index=delta.choice.index,
                    text=(_echo(plan, delta.choice) if delta.first else "") + delta.text,
                    token_ids=list(delta.token_ids),
                    logprobs=logprobs[delta.choice.index].take(delta),
                    finish_reason=delta.finish_reason,
                )
                running = usage(generation, plan.n) if options.every_chunk() else None
                yield sse(dump(Completion(**plan.head, choices=[choice], usage=running)))
            else:
                if options.include_usage:
                    totals = usage(generation, plan.n)
                    yield sse(dump(Completion(**plan.head, choices=[], usage=totals)))
    except ApiError as error:
        yield sse(openai_body(error))
    yield DONE
