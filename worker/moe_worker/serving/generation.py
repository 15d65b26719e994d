"""What a completion request is to the engine, and what comes back: the port between the HTTP API
and the serving runtime. Torch-free; neither side imports the other.

Threads: the HTTP layer runs on its own thread(s) (asyncio); the serving loop owns the process
group on the main thread. `Backend.submit` is called from HTTP threads and returns at once; the
serving loop admits the request at a step boundary and calls `on_event` from ITS thread for every
new token and once more at the end, so a callback must only hand the event over (for example with
`loop.call_soon_threadsafe`), never block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from moe_contract.plan import Plan
from moe_contract.shape import ModelShape
from moe_contract.switch import SwitchAnswer

FinishReason = Literal["stop", "length", "abort", "error"]
"""stop: EOS or a stop token; length: max_tokens or the context; abort: the client went away or the
server is stopping; error: the engine failed the request (the event's `error` says why)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses tokens and when it stops (OpenAI completions semantics)."""

    temperature: float = 1.0
    """0 is greedy (argmax)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed of this request's randomness; None lets the server pick one."""
    max_tokens: int = 16
    """Most tokens to generate."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the generation, besides the model's EOS ids."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS ids."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def finish_reason(
    token_id: int,
    generated: int,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    context_tokens: int,
    max_context: int,
) -> FinishReason | None:
    """ "stop" (EOS or a stop token), "length" (max_tokens or the context is full), or None.

    One rule for the scheduler on the leader and the world-1 generator.

    `generated` counts tokens generated so far including `token_id`; `context_tokens` is the
    sequence's whole length (prompt + generated).
    """
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if generated >= params.max_tokens or context_tokens >= max_context:
        return "length"
    return None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request since its previous event; the last event has `finish_reason`."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None


EventSink = Callable[[TokenEvent], None]


class AdmissionError(Exception):
    """A request refused before any token: the HTTP layer maps it to an OpenAI-shaped error."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(AdmissionError):
    """Cannot ever run as asked, e.g. prompt + max_tokens over the context (param max_tokens)."""


class QueueFull(AdmissionError):
    """Every KV-cache budget is taken and the waiting queue is full: try again later."""

    status = 429
    code = "queue_full"


class NotReady(AdmissionError):
    """The group has not formed yet, or is stopping."""

    status = 503
    code = "not_ready"


@dataclass(frozen=True)
class ModelCard:
    """What the API tells clients about the served model (GET /v1/models, limits)."""

    name: str
    shape: ModelShape
    max_context: int
    """Longest prompt + completion one request may have."""
    eos_token_ids: tuple[int, ...] = ()
    tokenizer_path: str | None = None
    """tokenizer.json shipped with the checkpoint, if any: text prompts need it."""


@dataclass(frozen=True)
class Load:
    """The group's load as a router weighs it (GET /v1/loads): requests waiting for a KV budget
    and running, and the KV cache tokens reserved of all ranks' budget."""

    waiting: int = 0
    running: int = 0
    used_tokens: int = 0
    capacity_tokens: int = 0

    @property
    def requests(self) -> int:
        """The load figure: waiting + running."""
        return self.waiting + self.running


class Backend(Protocol):
    """What the HTTP layer needs of a rank (the runtime provides it, on every rank).

    Generation and the plan control are only for the leader (rank 0); others answer 421.
    """

    @property
    def rank(self) -> int: ...
    @property
    def is_leader(self) -> bool: ...
    @property
    def card(self) -> ModelCard: ...
    def is_ready(self) -> bool: ...
    def is_live(self) -> bool:
        """False once the serving loop stopped making progress while it should (a hung
        collective): the liveness probe fails and the group is recreated."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus exposition of this rank's metrics, never waiting on compute."""
        ...

    def load(self) -> Load:
        """The group's requests and KV use (leader; others answer an empty load), never
        waiting on compute."""
        ...

    # generation (leader)
    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        """Queue a request; raises AdmissionError (InvalidRequest, QueueFull, NotReady)."""
        ...

    def abort(self, request_id: str) -> None: ...
    # plan control (leader; GET on every rank)
    def current_plan(self) -> Plan | None: ...
    def validate_plan(self, plan: Plan) -> None:
        """Raises PlanError naming the field when `plan` does not fit this group."""
        ...

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Blocking: every rank serves `plan`, or the answer says why not (`timeout` when not
        every rank switched within `timeout` seconds)."""
        ...
