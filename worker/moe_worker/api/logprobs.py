"""Log-probabilities in OpenAI's two shapes, from the engine's `TokenLogprob`s. Pure.

Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the
most likely tokens' texts, and the token itself, as vLLM adds it) and `text_offset` (characters
from the start of the prompt's text, each token's text counted alone). Chat: a `content` list
with each token's text, log-probability, UTF-8 bytes and its `top_logprobs`.

A token's text is the token decoded alone (special tokens kept); without a tokenizer it is
`token_id:<id>`, vLLM's convention for clients that want ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moe_worker.api.chat_schemas import ContentLogprob, TopLogprob
from moe_worker.api.schemas import CompletionLogprobs
from moe_worker.serving.generation import TokenLogprob


class TokenTexts:
    """Each token id's text, decoded once."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token}"
            else:
                text = self.tokenizer.decode([token], skip_special_tokens=False)
            self._texts[token] = text
        return text


def completion_logprobs(
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    texts: TokenTexts,
    offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy shape of `tokens` (entry None: a prompt's first token, which has none),
    their offsets counted from `offset`; and the offset after the last."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in zip(tokens, entries, strict=True):
        text = texts(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.logprob)
        top = {texts(t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)
        out.top_logprobs.append(top)
    return out, offset


def extend(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset


def chat_logprobs(
    tokens: Sequence[int], entries: Sequence[TokenLogprob], texts: TokenTexts
) -> list[ContentLogprob]:
    """The chat shape of `tokens`: each with its `top_logprobs` (as many as asked)."""
    return [
        ContentLogprob(
            **_top(token, entry.logprob, texts).model_dump(),
            top_logprobs=[_top(t, lp, texts) for t, lp in entry.top],
        )
        for token, entry in zip(tokens, entries, strict=True)
    ]


def _top(token: int, logprob: float, texts: TokenTexts) -> TopLogprob:
    text = texts(token)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
