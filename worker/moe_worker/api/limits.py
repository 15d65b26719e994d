"""Every bound a completion request is held to, and the checks of its prompt and stop lists.

A request's lists travel on: prompts and stop token ids to the ranks, stop strings into every
choice's text stream. Each is bounded here, checked on the parsed JSON before any element is
looked at one by one and before anything reaches the tokenizer or the engine, and each refusal
names the parameter and the bound. The union types (`prompt`: text, token ids, or a list of
either; `stop`: a string or a list of them) are checked by hand: pydantic's union errors describe
the first branch that failed ("Input should be a valid string" for a list of 10,000 stop
strings), not the rule the request broke.

Bounds that depend on the served model (`ModelBounds`: its context and vocabulary, and so the
characters a text may have before it is tokenized) come in the validation context; the others
are constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationInfo
from pydantic_core import PydanticCustomError

# The bounds of the lists and strings a request may carry (docs/worker.md, "Limits").
MAX_PROMPTS = 64
"""Prompts in one request (the OpenAI app's default; `create_openai_app(max_prompts=...)`)."""
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
"""Characters of one stop string: text is held back by the longest stop string's length."""
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300
"""Entries of `logit_bias`, for when it is supported (today only an empty one is accepted)."""
MAX_MESSAGES = 4096
"""Messages in one chat request: each is a pass of the template's loop, on the leader."""
CHARS_PER_TOKEN = 32
"""A text prompt may have at most this many characters per token of the model's context: one
longer would have to average more characters a token than any tokenizer's text does to fit."""

RULE = "request_rule"
"""pydantic error type of these checks; the message starts with the location (`prompt[3]`)."""

PromptValue = str | list[int] | list[str] | list[list[int]]


@dataclass(frozen=True)
class ModelBounds:
    """The served model's bounds on a request, handed to validation as its context."""

    max_prompts: int = MAX_PROMPTS
    max_context: int | None = None
    """Token ids of a prompt must leave room to generate: fewer than this. None: unchecked."""
    vocab_size: int | None = None
    """Token ids must be below it. None: unchecked."""

    @property
    def max_chars(self) -> int | None:
        return None if self.max_context is None else CHARS_PER_TOKEN * self.max_context

    @classmethod
    def of(cls, info: ValidationInfo) -> ModelBounds:
        context = info.context
        return context if isinstance(context, ModelBounds) else cls()


def refuse(where: str, rule: str) -> PydanticCustomError:
    return PydanticCustomError(RULE, "{where}: {rule}", {"where": where, "rule": rule})


def check_prompt(value: Any, info: ValidationInfo) -> PromptValue:
    """`prompt`: text, token ids, or a non-empty list of texts or of token-id lists."""
    bounds = ModelBounds.of(info)
    if isinstance(value, str):
        _check_text(value, "prompt", bounds)
        return value
    if not isinstance(value, list):
        raise refuse(
            "prompt",
            f"must be text, a list of token ids, or a list of texts or token-id lists; "
            f"got {_kind(value)}",
        )
    if not value:
        raise refuse("prompt", "is empty")
    first = value[0]
    if not isinstance(first, str | list):  # token ids (the check names any that is not one)
        return check_token_ids(value, "prompt", bounds)
    if len(value) > bounds.max_prompts:
        raise refuse("prompt", f"{len(value)} prompts, at most {bounds.max_prompts} a request")
    for index, item in enumerate(value):
        where = f"prompt[{index}]"
        if isinstance(item, str) and isinstance(first, str):
            _check_text(item, where, bounds)
        elif isinstance(item, list) and isinstance(first, list):
            check_token_ids(item, where, bounds)
        else:
            raise refuse(
                where,
                f"is {_kind(item)} but prompt[0] is {_kind(first)}: a list of prompts holds "
                f"texts or token-id lists, not both",
            )
    return value


def check_token_ids(value: Any, where: str, bounds: ModelBounds) -> list[int]:
    """A prompt's token ids: in the vocabulary, fewer than the context (each when known)."""
    if not isinstance(value, list):
        raise refuse(where, f"must be a list of token ids; got {_kind(value)}")
    if not value:
        raise refuse(where, "has no tokens")
    if bounds.max_context is not None and len(value) >= bounds.max_context:
        raise refuse(
            where,
            f"{len(value)} tokens leave no room to generate in the model's context of "
            f"{bounds.max_context} tokens",
        )
    return _ids(value, where, bounds.vocab_size)


def check_stop_token_ids(value: Any, info: ValidationInfo) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise refuse("stop_token_ids", f"must be a list of token ids; got {_kind(value)}")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise refuse("stop_token_ids", f"{len(value)} token ids, at most {MAX_STOP_TOKEN_IDS}")
    return _ids(value, "stop_token_ids", ModelBounds.of(info).vocab_size)


def check_stop(value: Any, info: ValidationInfo) -> str | list[str] | None:
    """`stop`: a string or a list of strings, each non-empty and short, few of them."""
    if value is None or isinstance(value, str):
        if value is not None:
            _check_stop_string(value, "stop")
        return value
    if not isinstance(value, list):
        raise refuse("stop", f"must be a string or a list of strings; got {_kind(value)}")
    if len(value) > MAX_STOP_STRINGS:
        raise refuse("stop", f"{len(value)} stop strings, at most {MAX_STOP_STRINGS}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise refuse(f"stop[{index}]", f"must be a string; got {_kind(item)}")
        _check_stop_string(item, f"stop[{index}]")
    return value


def check_logit_bias_size(value: Any) -> Any:
    """Before its entries are validated: at most MAX_LOGIT_BIAS of them."""
    if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:
        raise refuse("logit_bias", f"{len(value)} entries, at most {MAX_LOGIT_BIAS}")
    return value


def _check_text(text: str, where: str, bounds: ModelBounds) -> None:
    limit = bounds.max_chars
    if limit is not None and len(text) > limit:
        raise refuse(
            where,
            f"{len(text)} characters, at most {limit} ({CHARS_PER_TOKEN} per token of the "
            f"model's context of {bounds.max_context} tokens); it is refused before tokenizing",
        )


def _check_stop_string(text: str, where: str) -> None:
    if not text:
        raise refuse(where, "is empty")
    if len(text) > MAX_STOP_CHARS:
        raise refuse(where, f"{len(text)} characters, at most {MAX_STOP_CHARS}")


def _ids(value: list[Any], where: str, vocab_size: int | None) -> list[int]:
    """Token ids: integers in 0..vocab_size - 1 (any >= 0 when the vocabulary is unknown)."""
    top = vocab_size if vocab_size is not None else 2**63
    # Passes at C speed first; the walk in Python only names the culprit of a refusal.
    if not value or (set(map(type, value)) == {int} and min(value) >= 0 and max(value) < top):
        return value
    for index, item in enumerate(value):
        if type(item) is not int:  # bool is an int to isinstance, not a token id
            raise refuse(f"{where}[{index}]", f"must be a token id (an integer); got {_kind(item)}")
        if item < 0:
            raise refuse(f"{where}[{index}]", f"token id {item} is negative")
        if item >= top:
            raise refuse(
                f"{where}[{index}]", f"token id {item} is outside the vocabulary 0..{top - 1}"
            )
    return value


def _kind(value: Any) -> str:
    """How a JSON value reads in a message: `a string`, `a number (2.5)`, `an object`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({str(value)[:20]})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
