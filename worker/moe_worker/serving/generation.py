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

from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_contract.shape import ModelShape
from moe_contract.switch import SwitchAnswer

MAX_LOGPROBS = 20
"""The most alternatives a token's log-probabilities may list (OpenAI's bound)."""

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
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives
    (0: the token's own only); None: no log-probabilities. Of the model's distribution, before
    temperature, top-k and top-p."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (the first has none): `echo` with logprobs."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}, got {value}")

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
    prefill_from: str | None = None
    """A request with the same prompt submitted just before this one (a sibling choice of
    `n`): when both run on one rank, this one's prompt K/V are copied from it instead of
    computed again (one prefill shared). Only an optimisation: without it, it prefills alone."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability), most likely first."""


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request since its previous event; the last event has `finish_reason`."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token of `token_ids`, when the request asked for `logprobs`."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On the request's first event, when it asked for `prompt_logprobs`: one per prompt
    token, None for the first (nothing predicts it)."""
    queue_seconds: float | None = None
    """On the first event: seconds the request waited before it was admitted."""


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
    """The group has not formed yet, or is stopping or draining."""

    status = 503
    code = "not_ready"


DRAINING = "the worker is draining before it stops: send the request to another replica"
"""What a request refused during a drain is told (503 before the first byte: a router retries)."""


@dataclass(frozen=True)
class DrainState:
    """Where a rank's drain stands (/readyz and POST /v1/drain say it)."""

    draining: bool
    in_flight: int | None  # requests still waiting or running (the leader's); None elsewhere
    timeout_s: float  # how long a SIGTERM's drain waits for them before the rank stops

    def to_document(self) -> dict[str, object]:
        return {
            "draining": self.draining,
            "inFlight": self.in_flight,
            "drainTimeoutSeconds": self.timeout_s,
        }


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
    chat_template_path: str | None = None
    """A Jinja chat template file replacing the checkpoint's (`--chat-template`); None: the
    checkpoint's own (tokenizer_config.json's `chat_template`, or chat_template.jinja)."""


@dataclass(frozen=True)
class ServingLoad:
    """The leader's view of the work in the group: the serving metrics and routers read it."""

    running: int = 0
    """Sequences admitted and not finished."""
    waiting: int = 0
    """Requests waiting for a KV cache budget."""
    kv_cache_usage: float = 0.0
    """Fraction of the group's KV cache blocks reserved (0..1)."""
    used_tokens: int = 0
    """KV cache tokens reserved, all ranks' budgets together (a router's GET /v1/loads)."""
    capacity_tokens: int = 0
    """KV cache tokens of all ranks' budgets."""

    @property
    def requests(self) -> int:
        """The load figure a router weighs: waiting + running."""
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

    # generation (leader)
    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        """Queue a request; raises AdmissionError (InvalidRequest, QueueFull, NotReady)."""
        ...

    def abort(self, request_id: str) -> None: ...
    def load(self) -> ServingLoad:
        """What the group is busy with now (leader; zeros elsewhere); never waits on compute."""
        ...

    # draining (every rank)
    def drain(self) -> DrainState:
        """Start draining (idempotent): not ready, new requests refused with NotReady, running
        sequences finish; the rank serves on (SIGTERM drains, then stops)."""
        ...

    def drain_state(self) -> DrainState: ...
    # plan control (leader; GET on every rank)
    def current_plan(self) -> Plan | None: ...
    def validate_plan(self, plan: Plan) -> None:
        """Raises PlanError naming the field when `plan` does not fit this group."""
        ...

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Blocking: every rank serves `plan`, or the answer says why not (`timeout` when not
        every rank switched within `timeout` seconds)."""
        ...

    # the group's membership (GET on every rank; the news of lost ranks for the leader)
    def group_status(self) -> GroupStatus | None:
        """The membership this rank serves in; None: the group has none of its own (any lost
        rank restarts it whole)."""
        ...

    def report_lost(self, ranks: list[int], reason: str) -> bool:
        """The leader drops these ranks at once; False: it cannot (no membership of its own)."""
        ...
