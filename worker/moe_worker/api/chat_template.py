"""A checkpoint's chat template: found as Hugging Face ships it, rendered as transformers does.

Where it comes from, first found wins: the file `--chat-template` names; `chat_template` in the
checkpoint's tokenizer_config.json (a string, or a list of named templates: "default" is used);
chat_template.jinja beside it. The special tokens the template may use (`bos_token`,
`eos_token`) come from tokenizer_config.json (a string, or an object with `content`).

Rendering follows transformers' conventions, so a template written for `apply_chat_template`
renders the same text: an immutable sandboxed Jinja environment (a template cannot reach Python
objects or change its arguments), `trim_blocks` and `lstrip_blocks`, the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` and any extra keyword arguments, the function
`raise_exception(message)` (a template refusing a conversation: answered as a 400 with its
message), `strftime_now(format)`, and a `tojson` filter that keeps non-ASCII text and takes
`indent`. The rendered text is tokenized without adding special tokens: the template writes them.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from moe_worker.api.errors import ApiError
from moe_worker.serving.generation import ModelCard

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class TemplateRefused(Exception):
    """The template's `raise_exception` was called: the conversation does not fit it."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    """The template's Jinja text."""
    origin: str
    """Where it was found (a file, or tokenizer_config.json's key): named in errors."""
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The conversation as the model's prompt text; TemplateRefused when the template
        raises, ApiError 500 naming the template when it is broken."""
        import jinja2

        try:
            return _compiled(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateRefused:
            raise
        except jinja2.TemplateError as error:
            raise ApiError(500, f"the chat template ({self.origin}) failed: {error}") from None


def load_chat_template(card: ModelCard) -> ChatTemplate | None:
    """The card's chat template, or None when the checkpoint ships none and none was given."""
    directory = None if card.tokenizer_path is None else Path(card.tokenizer_path).parent
    config = _tokenizer_config(directory)
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    if card.chat_template_path is not None:
        path = Path(card.chat_template_path)
        try:
            return ChatTemplate(path.read_text(), str(path), **tokens)
        except OSError as error:
            raise ApiError(500, f"--chat-template {path} cannot be read: {error}") from None
    source = _named_template(config.get("chat_template"))
    if source is not None:
        return ChatTemplate(source, f"{TOKENIZER_CONFIG} chat_template", **tokens)
    if directory is not None and (directory / TEMPLATE_FILE).is_file():
        return ChatTemplate((directory / TEMPLATE_FILE).read_text(), TEMPLATE_FILE, **tokens)
    return None


def tokenizer_config(card: ModelCard) -> dict[str, Any]:
    """The checkpoint's tokenizer_config.json ({} when there is none)."""
    directory = None if card.tokenizer_path is None else Path(card.tokenizer_path).parent
    return _tokenizer_config(directory)


def _tokenizer_config(directory: Path | None) -> dict[str, Any]:
    if directory is None or not (directory / TOKENIZER_CONFIG).is_file():
        return {}
    config = json.loads((directory / TOKENIZER_CONFIG).read_text())
    return config if isinstance(config, dict) else {}


def _named_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


class TemplateCache:
    """The card's template, loaded once (a file read and a parse)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str | None, str | None], ChatTemplate | None] = {}

    def get(self, card: ModelCard) -> ChatTemplate | None:
        key = (card.tokenizer_path, card.chat_template_path)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_chat_template(card)
            return self._loaded[key]


_COMPILED: dict[str, Any] = {}
_COMPILED_LOCK = threading.Lock()


def _compiled(source: str) -> Any:
    with _COMPILED_LOCK:
        if source not in _COMPILED:
            _COMPILED[source] = _environment().from_string(source)
        return _COMPILED[source]


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)
