"""A scripted `Backend` for the HTTP layer's tests, and a tiny tokenizer trained on the spot.

`ScriptedBackend` is a TEST DOUBLE of the serving port
(`moe_worker.serving.generation.Backend`), not a model and not the runtime: its tokens are a
fixed function of the prompt and seed, produced on a thread of its own (as the serving loop
would) one event per token; admission errors, readiness,
liveness, a held generation and the outcome of a plan switch are set by the test. The runtime's
own tests run the same client checks (`openai_checks`) against real worker processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_contract.group import GroupStatus
from moe_contract.plan import Plan, round_robin_plan, validate_plan
from moe_contract.shape import ModelShape
from moe_contract.switch import BLOCKING, TIMEOUT, SwitchAnswer
from moe_worker.serving.generation import (
    AdmissionError,
    DrainState,
    EventSink,
    GenerationRequest,
    ModelCard,
    ServingLoad,
    TokenEvent,
    TokenLogprob,
)

EOS = 1
WAIT = 30.0
"""Seconds the double waits on a test's gate before giving up (a failing test, never a hang)."""

Script = Callable[[GenerationRequest], list[int]]


def scripted_logprob(position: int, token: int, top: int) -> TokenLogprob:
    """The double's log-probabilities: -0.5 x (position + 1) for the token, alternatives
    token + 1, token + 2, ... just below it."""
    logprob = -0.5 * (position + 1)
    return TokenLogprob(logprob, tuple((token + k, logprob - k) for k in range(1, top + 1)))


def counting_script(vocab: int) -> Script:
    """Tokens 2 + (sum(prompt) + seed + 3 i) mod (vocab - 2): never EOS (1) nor [UNK] (0)."""

    def script(request: GenerationRequest) -> list[int]:
        base = sum(request.prompt_token_ids) + (request.sampling.seed or 0)
        return [2 + (base + 3 * i) % (vocab - 2) for i in range(request.sampling.max_tokens)]

    return script


class ScriptedBackend:
    """Test double of `Backend` (see the module docstring); every attribute is the test's to set.

    One thread per request emits the script's tokens, one event each, and ends with "length", or
    "stop" at EOS or a stop token (included in the tokens, as the last one) unless ignore_eos.
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        rank: int = 0,
        world_size: int = 4,
        script: Script | None = None,
    ) -> None:
        self._rank = rank
        self._card = card
        self.world_size = world_size
        self.script = script or counting_script(card.shape.vocab_size)
        self.ready = True
        self.live = True
        self.draining = False
        self.refuse: AdmissionError | None = None
        """Raised by submit once `admit` requests were admitted."""
        self.admit = 0
        self.end_with: tuple[str, str | None] | None = None
        """(finish_reason, error) replacing the script's end: "error" or "abort"."""
        self.fails: Callable[[GenerationRequest], bool] = lambda request: True
        """Which requests `end_with` ends."""
        self.holds: Callable[[GenerationRequest], bool] = lambda request: False
        """Which requests wait on `release` after their first token."""
        self.release = threading.Event()
        self.gate = threading.Event()
        """Cleared: generations wait before their first token (abort tests)."""
        self.gate.set()
        self.submitted: list[GenerationRequest] = []
        self.load_now = ServingLoad()
        """What `load()` answers."""
        self.aborted: set[str] = set()
        self.group: GroupStatus | None = None
        """What GET /v1/group answers (None: 404, no membership of its own)."""
        self.lost_reports: list[tuple[list[int], str]] = []
        self.abort_seen = threading.Event()
        shape = card.shape
        self.plan: Plan | None = round_robin_plan(shape.layers, shape.experts, world_size)
        self.switch_outcome: str | SwitchAnswer = "apply"
        """apply | timeout | a dict answered as is."""
        self.switch_gate = threading.Event()
        self.switch_gate.set()
        self.switch_timeouts: list[float] = []

    # ------------------------------------------------------------ the port

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def is_leader(self) -> bool:
        return self._rank == 0

    @property
    def card(self) -> ModelCard:
        return self._card

    def is_ready(self) -> bool:
        return self.ready

    def is_live(self) -> bool:
        return self.live

    def metrics_text(self) -> bytes:
        version = self.plan.version if self.plan else 0
        return f"# TYPE moe_plan_version gauge\nmoe_plan_version {version}\n".encode()

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        if self.refuse is not None and len(self.submitted) >= self.admit:
            raise self.refuse
        self.submitted.append(request)
        threading.Thread(target=self._generate, args=(request, on_event), daemon=True).start()

    def load(self) -> ServingLoad:
        return self.load_now

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self.abort_seen.set()

    def current_plan(self) -> Plan | None:
        return self.plan

    def drain(self) -> DrainState:
        self.draining, self.ready = True, False
        return self.drain_state()

    def drain_state(self) -> DrainState:
        return DrainState(self.draining, len(self.submitted) if self.is_leader else None, 20.0)

    def validate_plan(self, plan: Plan) -> None:
        s = self._card.shape
        validate_plan(plan, num_layers=s.layers, num_experts=s.experts, world_size=self.world_size)

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        self.switch_timeouts.append(timeout)
        self.switch_gate.wait(WAIT)
        if self.switch_outcome == "timeout":
            return SwitchAnswer.refused(TIMEOUT)
        if isinstance(self.switch_outcome, SwitchAnswer):
            return self.switch_outcome
        self.plan = plan
        return SwitchAnswer.switched(plan, 0.0, BLOCKING)

    def group_status(self) -> GroupStatus | None:
        return self.group

    def report_lost(self, ranks: list[int], reason: str) -> bool:
        if self.group is None:
            return False
        self.lost_reports.append((ranks, reason))
        return True

    # ------------------------------------------------------------ the "serving loop"

    def _generate(self, request: GenerationRequest, on_event: EventSink) -> None:
        rid = request.request_id
        self.gate.wait(WAIT)
        stops = set(request.sampling.stop_token_ids)
        if not request.sampling.ignore_eos:
            stops |= set(self._card.eos_token_ids)
        tokens = self.script(request)[: request.sampling.max_tokens]
        emit = self._with_logprobs(request, on_event)
        for i, token in enumerate(tokens):
            if rid in self.aborted:
                on_event(TokenEvent(rid, (), "abort"))
                return
            if i == 1 and self.holds(request):
                self.release.wait(WAIT)
                if rid in self.aborted:
                    on_event(TokenEvent(rid, (), "abort"))
                    return
            last = i == len(tokens) - 1
            if self.end_with is not None and self.fails(request) and last:
                on_event(TokenEvent(rid, (), *self.end_with))  # type: ignore[arg-type]
                return
            if token in stops:
                emit(i, token, "stop")
                return
            if last:
                emit(i, token, "length")
                return
            emit(i, token, None)
        on_event(TokenEvent(rid, (), "length"))  # max_tokens 0: cannot happen, the port forbids

    @staticmethod
    def _with_logprobs(request: GenerationRequest, on_event: EventSink) -> Any:
        """An emitter of one token's event, with the log-probabilities the request asked for
        (`scripted_logprob`; the prompt's on the first event)."""
        s, prompt = request.sampling, request.prompt_token_ids

        def emit(i: int, token: int, finish: Any) -> None:
            logprobs = () if s.logprobs is None else (scripted_logprob(i, token, s.logprobs),)
            scored = None
            if s.prompt_logprobs is not None and i == 0:
                top = s.prompt_logprobs
                scored = (None, *(scripted_logprob(-1, t, top) for t in prompt[1:]))
            on_event(
                TokenEvent(
                    request.request_id,
                    (token,),
                    finish,
                    logprobs=logprobs,
                    prompt_logprobs=scored,
                    queue_seconds=0.0 if i == 0 else None,
                )
            )

        return emit


def make_card(
    name: str = "tiny-moe",
    *,
    vocab: int = 64,
    max_context: int = 32,
    tokenizer_path: str | None = None,
) -> ModelCard:
    return ModelCard(
        name=name,
        shape=ModelShape(vocab_size=vocab),
        max_context=max_context,
        eos_token_ids=(EOS,),
        tokenizer_path=tokenizer_path,
    )


CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on a mat",
    "the end of the story",
]


def train_tokenizer(directory: Path) -> Path:
    """A WordLevel tokenizer ([UNK] = 0, </s> = 1, then the corpus's words), saved as
    `directory/tokenizer.json` the way a checkpoint ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path
