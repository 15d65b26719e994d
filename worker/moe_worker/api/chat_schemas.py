"""Request and response bodies of OpenAI's chat completions API, as pydantic models.

As for completions (`schemas`): OpenAI's names, types and defaults; vLLM's extras (`top_k`,
`stop_token_ids`, `ignore_eos`, `add_generation_prompt`, `continue_final_message`,
`chat_template_kwargs`); what this server cannot honour is refused naming the parameter
(`unsupported`): tools and functions (no tool-call parser), JSON response formats (no
constrained decoding), penalties, logit bias. Unknown fields are refused too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from moe_worker.api.limits import MAX_MESSAGES
from moe_worker.api.schemas import (
    Choices,
    LogitBias,
    Seed,
    Stops,
    StopTokenIds,
    StreamOptions,
    TopLogprobs,
    Usage,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    # Clients send back the assistant messages they got (with `refusal`, `tool_calls`: null):
    # extra keys are kept and handed to the template, as transformers would.
    model_config = ConfigDict(extra="allow")

    role: Role
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """OpenAI's older name of max_completion_tokens (which wins when both are set)."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Choices | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stops = None
    seed: Seed | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    """Alternatives per token (needs `logprobs`)."""
    user: StrictStr | None = None
    # refused unless neutral (see `unsupported`)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: LogitBias = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def completion_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) of the first parameter set to something this server cannot do."""
        no_tools = "function calling is not supported by this server; send messages only"
        checks: list[tuple[str, bool, str]] = [
            ("tools", bool(self.tools), no_tools),
            ("tool_choice", self.tool_choice not in (None, "none", "auto"), no_tools),
            ("functions", bool(self.functions), no_tools),
            ("function_call", self.function_call not in (None, "none", "auto"), no_tools),
            (
                "response_format",
                self.response_format is not None and self.response_format.type != "text",
                "only {'type': 'text'} is supported (no constrained decoding)",
            ),
            (
                "top_logprobs",
                self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs,
                "needs logprobs: true",
            ),
            (
                "continue_final_message",
                bool(self.continue_final_message and self.add_generation_prompt),
                "cannot be combined with add_generation_prompt: true",
            ),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        for param, refused, why in checks:
            if refused:
                return param, why
        return None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ContentLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[Any] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int]
    """vLLM's field: the generated tokens."""


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    """A stream chunk: a choice's role first (content ""), then its new text; the last chunk
    of a choice has its finish_reason; with include_usage one more has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
