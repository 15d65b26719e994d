"""Request and response bodies of the OpenAI completions API, as pydantic models.

Field names, types and defaults mirror OpenAI's API reference for `/v1/completions` and
`/v1/models`; nullable fields accept null as the official client may send it. vLLM's extras that
token-level clients use are here too: `top_k`, `stop_token_ids`, `ignore_eos`, and `token_ids` in
every choice. Parameters OpenAI has and this server cannot honour are declared so that a request
using them is refused naming the parameter (`unsupported`), not silently ignored; unknown fields
are refused the same way. The lists a request carries are bounded, and the union-typed fields
checked, by `moe_worker.api.limits` (validation context: its `ModelBounds`). The chat API's
bodies are in `chat_schemas`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
)

from moe_worker.api.limits import (
    PromptValue,
    check_logit_bias_size,
    check_prompt,
    check_stop,
    check_stop_token_ids,
)
from moe_worker.serving.generation import MAX_LOGPROBS

Stops = Annotated[str | list[str] | None, PlainValidator(check_stop)]
StopTokenIds = Annotated[list[int] | None, PlainValidator(check_stop_token_ids)]
LogitBias = Annotated[dict[str, float] | None, BeforeValidator(check_logit_bias_size)]
INT64 = 2**63
Seed = Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]
MAX_N = 16
"""The most choices (`n`) one prompt may ask for: they share its prefill, not its KV memory."""
Choices = Annotated[StrictInt, Field(ge=1, le=MAX_N)]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    """Send one more chunk before `[DONE]`, with no choices and the request's `usage`."""
    continuous_usage_stats: bool | None = False
    """vLLM's: every chunk carries the usage so far (with include_usage)."""

    def every_chunk(self) -> bool:
        return bool(self.include_usage and self.continuous_usage_stats)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: Annotated[PromptValue, PlainValidator(check_prompt)]
    """Text, token ids, or a list of either (one choice per prompt)."""
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    """None: 16, or what the context leaves if less. 0 only with `echo` (score the prompt)."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Choices | None = None
    """Choices per prompt; they share the prompt's prefill. With a seed, choice j uses
    seed + j."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stops = None
    """Strings that end a choice (not included in its text); they need the tokenizer."""
    seed: Seed | None = None
    user: StrictStr | None = None
    """Accepted and unused (logged with the request)."""
    logprobs: TopLogprobs | None = None
    """Log-probabilities of each token and this many alternatives (of the model's distribution,
    before temperature and top-p)."""
    echo: bool | None = False
    """The prompt first, in the text and (with logprobs) in the log-probabilities."""
    # OpenAI's, refused unless at their neutral value (see `unsupported`)
    best_of: StrictInt | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: LogitBias = None
    suffix: StrictStr | None = None
    # vLLM's extras
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    """0 or -1: no top-k cut."""
    stop_token_ids: StopTokenIds = None
    ignore_eos: bool | None = False

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) of the first parameter set to something this server cannot do."""
        checks: list[tuple[str, bool, str]] = [
            (
                "best_of",
                self.best_of not in (None, 1, self.n),
                "best_of (ranking choices by likelihood) is not supported; ask for n choices "
                "with logprobs and rank them",
            ),
            (
                "suffix",
                self.suffix is not None,
                "suffix (insertion) is not supported: the models served here only continue text",
            ),
            (
                "max_tokens",
                self.max_tokens == 0 and not self.echo,
                "must be at least 1; 0 only with echo (to score the prompt)",
            ),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        for param, refused, why in checks:
            if refused:
                return param, why
        return None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy log-probabilities, one entry per token (the prompt's first with echo)."""

    tokens: list[str]
    """Each token alone as text; `token_id:<id>` without a tokenizer (vLLM's convention)."""
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    """The `logprobs` most likely tokens at each position, and the token itself."""
    text_offset: list[int]
    """Where each token starts, in characters from the start of the prompt's text."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    """Decoded with the checkpoint's tokenizer; "" when it ships none (see `token_ids`)."""
    token_ids: list[int]
    """The generated tokens (in a stream chunk: the new ones)."""
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    """stop | length; in a stream, null until the choice's last chunk."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The response, and each stream chunk (with the new tokens only; `usage` null but in the
    final chunk when `stream_options.include_usage`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-ep"
    max_model_len: int
    """vLLM's field: the longest prompt + completion one request may have."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
