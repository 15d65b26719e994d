"""From a request's `prompt` to checked token ids, and the tokenizer that turns text into them.

Text (in prompts, in `stop`, in responses) needs the checkpoint's `tokenizer.json`, loaded with
Hugging Face `tokenizers`; token ids never do. Every limit a prompt can break is checked here,
before the engine sees it, each refusal naming `prompt` or `max_tokens`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from moe_worker.api.errors import ApiError
from moe_worker.serving.generation import ModelCard

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions."""


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


def prompt_token_ids(
    prompt: str | list[Any], tokenizer: Any | None, card: ModelCard, *, max_prompts: int
) -> list[list[int]]:
    """Each prompt of the request as token ids; a 400 naming `prompt` for any it cannot run."""
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt: is empty", "prompt")
    if len(prompts) > max_prompts:
        raise ApiError(400, f"prompt: {len(prompts)} prompts, at most {max_prompts}", "prompt")
    ids = [_encode(item, tokenizer) for item in prompts]
    for index, tokens in enumerate(ids):
        _check(tokens, card, where="prompt" if len(ids) == 1 else f"prompt[{index}]")
    return ids


def _encode(prompt: str | list[int], tokenizer: Any | None) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    if tokenizer is None:
        raise ApiError(
            400,
            "prompt: text needs the model's tokenizer.json, which this checkpoint lacks; "
            "send token ids",
            "prompt",
        )
    return list(tokenizer.encode(prompt).ids)


def _check(tokens: Sequence[int], card: ModelCard, *, where: str) -> None:
    if not tokens:
        raise ApiError(400, f"{where}: has no tokens", "prompt")
    vocab = card.shape.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"{where}: token {bad} is outside the vocabulary 0..{vocab - 1}", "prompt"
        )
    if len(tokens) >= card.max_context:
        raise ApiError(
            400,
            f"{where}: {len(tokens)} tokens leave no room to generate in the model's context of "
            f"{card.max_context} tokens",
            "prompt",
        )


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


def check_stop_token_ids(ids: list[int] | None, card: ModelCard) -> tuple[int, ...]:
    vocab = card.shape.vocab_size
    bad = next((t for t in ids or () if t >= vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"stop_token_ids: {bad} is outside the vocabulary 0..{vocab - 1}", "stop_token_ids"
        )
    return tuple(ids or ())
