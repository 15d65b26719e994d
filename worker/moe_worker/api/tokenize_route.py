"""`/tokenize`, `/detokenize` and `/tokenizer_info`, in vLLM's request and response shapes: the
served model's tokenizer for clients that count or build tokens themselves (lm-eval's "remote"
tokenizer reads the last two)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api.body import read_model
from moe_worker.api.chat_route import render_text
from moe_worker.api.chat_schemas import ChatCompletionRequest, ChatMessage
from moe_worker.api.chat_template import tokenizer_config
from moe_worker.api.completion_route import Routes
from moe_worker.api.errors import ApiError
from moe_worker.api.logprobs import TokenTexts
from moe_worker.api.prompts import check_text_size

MAX_TOKENIZE_CHARS = 4 * 1024 * 1024
"""Text longer than this is refused before any tokenizing (the body limit is 8 MiB)."""


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: Annotated[StrictStr, Field(max_length=MAX_TOKENIZE_CHARS)] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    """Default: true for a prompt, false for messages (the template writes them)."""
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


async def tokenize(routes: Routes, request: Request) -> Response:
    body = await read_model(request, TokenizeRequest)
    card = routes.check_model(body.model) if body.model is not None else routes.backend.card
    tokenizer = await asyncio.to_thread(routes.tokenizers.get, card)
    if tokenizer is None:
        raise ApiError(400, "this checkpoint ships no tokenizer.json: nothing to tokenize with")
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "prompt: send either a prompt or messages", "prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(
            model=card.name,
            messages=body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
        )
        text = await asyncio.to_thread(render_text, routes, chat, card, tokenizer)
        check_text_size(text, card, "messages")
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        check_text_size(text, card, "prompt")
        special = True if body.add_special_tokens is None else body.add_special_tokens
    ids = await routes.encoder.encode(tokenizer, text, special_tokens=special)
    texts = TokenTexts(tokenizer)
    return JSONResponse(
        {
            "count": len(ids),
            "max_model_len": card.max_context,
            "tokens": ids,
            "token_strs": [texts(t) for t in ids] if body.return_token_strs else None,
        }
    )


async def detokenize(routes: Routes, request: Request) -> Response:
    body = await read_model(request, DetokenizeRequest)
    card = routes.check_model(body.model) if body.model is not None else routes.backend.card
    tokenizer = await asyncio.to_thread(routes.tokenizers.get, card)
    if tokenizer is None:
        raise ApiError(400, "this checkpoint ships no tokenizer.json: nothing to decode with")
    if len(body.tokens) > card.max_context:
        raise ApiError(
            400,
            f"tokens: {len(body.tokens)} tokens, at most the model's context of {card.max_context}",
            "tokens",
        )
    vocab = card.shape.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"tokens: {bad} is outside the vocabulary 0..{vocab - 1}", "tokens")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})


async def tokenizer_info(routes: Routes) -> Response:
    """The tokenizer's configuration (tokenizer_config.json's string fields), the chat template
    in use and the context length, as vLLM's /tokenizer_info answers."""
    card = routes.backend.card
    config = await asyncio.to_thread(tokenizer_config, card)
    template = await asyncio.to_thread(routes.templates.get, card)
    info: dict[str, Any] = {k: v for k, v in config.items() if isinstance(v, str | int | bool)}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        info[name] = value if isinstance(value, str) else None
    info["chat_template"] = None if template is None else template.source
    info["model_max_length"] = card.max_context
    return JSONResponse(info)
