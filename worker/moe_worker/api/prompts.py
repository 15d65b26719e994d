"""From a request's `prompt` to checked token ids, and the tokenizer that turns text into them.

Text (in prompts, in `stop`, in responses) needs the checkpoint's `tokenizer.json`, loaded with
Hugging Face `tokenizers`; token ids never do. The request's shape and list bounds were checked
when it was parsed (`moe_worker.api.limits`: a text too long to fit is refused before it is
tokenized); what only the token ids tell is checked here, before the engine sees them, each
refusal naming `prompt` or `max_tokens`.

Encoding runs on the `Encoder`'s thread, never on the event loop, and with the GIL released:
`Tokenizer.encode` holds the GIL while it works, which stops every Python thread of the leader,
its serving loop included; `encode_batch` releases it. One thread: tokenizing never takes more
than a core from the serving loop, and a request's prompts are encoded one at a time, so other
requests' prompts take turns with them (docs/worker.md, "Limits", has the measurements).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from moe_worker.api.errors import ApiError
from moe_worker.api.limits import CHARS_PER_TOKEN
from moe_worker.serving.generation import ModelCard

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions."""
TOKENIZER_THREADS = 1
"""Threads that encode text prompts (each a core at most while it works)."""


class TokenizerCache:
    """The tokenizer of a model card, loaded once on first use (it can take a second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Any] = {}

    def get(self, card: ModelCard) -> Any | None:
        """The `tokenizers.Tokenizer` of `card`, or None when the checkpoint ships none."""
        if card.tokenizer_path is None:
            return None
        with self._lock:
            if card.tokenizer_path not in self._loaded:
                from tokenizers import Tokenizer  # only servers with text need the package

                self._loaded[card.tokenizer_path] = Tokenizer.from_file(card.tokenizer_path)
            return self._loaded[card.tokenizer_path]


class Encoder:
    """Text to token ids on threads of its own, without the GIL (see the module docstring)."""

    def __init__(self, threads: int = TOKENIZER_THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="moe-tokenize")

    async def encode(self, tokenizer: Any, text: str, special_tokens: bool = True) -> list[int]:
        loop = asyncio.get_running_loop()
        encode = functools.partial(encode_without_gil, special_tokens=special_tokens)
        return await loop.run_in_executor(self._pool, encode, tokenizer, text)


def encode_without_gil(tokenizer: Any, text: str, special_tokens: bool = True) -> list[int]:
    """`tokenizer.encode(text).ids`, with the GIL released while the tokenizer works."""
    encoded = tokenizer.encode_batch([text], add_special_tokens=special_tokens)
    return encoded[0].ids  # type: ignore[no-any-return]


def check_text_size(text: str, card: ModelCard, where: str) -> None:
    """Text built by the server (a rendered chat) or sent outside the completion schema
    (`/tokenize`) is bounded as a prompt is, before it is tokenized: a 400 naming `where`."""
    limit = CHARS_PER_TOKEN * card.max_context
    if len(text) > limit:
        raise ApiError(
            400,
            f"{where}: {len(text)} characters, at most {limit} ({CHARS_PER_TOKEN} per token of "
            f"the model's context of {card.max_context} tokens); it is refused before tokenizing",
            where,
        )


async def prompt_token_ids(
    prompt: str | list[Any], tokenizer: Any | None, card: ModelCard, encoder: Encoder
) -> list[list[int]]:
    """Each prompt of the request (already parsed and bounded) as token ids, encoded and checked
    one at a time: the first that cannot run stops the rest with a 400 naming `prompt`."""
    single = isinstance(prompt, str) or not isinstance(prompt[0], str | list)
    prompts: list[str | list[int]] = [prompt] if single else list(prompt)  # type: ignore[list-item]
    ids = []
    for index, item in enumerate(prompts):
        tokens = item if not isinstance(item, str) else await _encode(item, tokenizer, encoder)
        check_tokens(tokens, card, where="prompt" if single else f"prompt[{index}]")
        ids.append(list(tokens))
    return ids


async def _encode(text: str, tokenizer: Any | None, encoder: Encoder) -> list[int]:
    if tokenizer is None:
        raise ApiError(
            400,
            "prompt: text needs the model's tokenizer.json, which this checkpoint lacks; "
            "send token ids",
            "prompt",
        )
    return await encoder.encode(tokenizer, text)


def check_tokens(
    tokens: Sequence[int], card: ModelCard, *, where: str, field: str = "prompt"
) -> None:
    """Token ids the model can run: some, fewer than its context, inside its vocabulary."""
    if not tokens:
        raise ApiError(400, f"{where}: has no tokens", field)
    if len(tokens) >= card.max_context:
        raise ApiError(
            400,
            f"{where}: {len(tokens)} tokens leave no room to generate in the model's context of "
            f"{card.max_context} tokens",
            field,
        )
    vocab = card.shape.vocab_size
    if min(tokens) < 0 or max(tokens) >= vocab:  # a tokenizer.json larger than the model
        bad = next(t for t in tokens if not 0 <= t < vocab)
        raise ApiError(400, f"{where}: token {bad} is outside the vocabulary 0..{vocab - 1}", field)


def max_tokens_for(asked: int | None, prompts: list[list[int]], card: ModelCard) -> int:
    """The request's max_tokens: as asked if every prompt leaves room for it (else a 400), or
    by default 16 cut to what the longest prompt leaves."""
    room = card.max_context - max(len(tokens) for tokens in prompts)
    if asked is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise ApiError(
            400,
            f"max_tokens: {asked} + the prompt's {card.max_context - room} tokens exceed the "
            f"model's context of {card.max_context} tokens",
            "max_tokens",
        )
    return asked
