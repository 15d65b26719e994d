"""What the leader tells every rank at a step boundary, and what each rank answers. Torch-free.

The leader's scheduler decides a step (`StepDescriptor`): sequences to release, its part of a
plan switch (`SwitchCommand`), new sequences and the rank that keeps each, and every rank's work
(`Chunk`: a prompt chunk or one decode token per sequence). It travels to all ranks as JSON,
plain data and never pickled objects, so every rank runs the same collectives in the same order:
a plan switch when there is one, one forward when ANY rank has work (a rank without work joins
with zero tokens). Each rank answers a `StepResult` (its sampled tokens and the requests it
failed), gathered by the leader.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from moe_contract.plan import Plan, parse_plan
from moe_worker.serving.generation import SamplingParams, TokenLogprob

SwitchAction = Literal["start", "poll", "flip", "abandon"]


@dataclass(frozen=True)
class NewSequence:
    """A request admitted this step, and the rank that keeps its KV cache."""

    request_id: str
    rank: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    """The request's own seed, or one the leader drew: sampling never depends on the rank."""
    reserve_tokens: int
    """KV tokens reserved at admission (prompt + max_tokens): the sequence never needs more."""
    generated: tuple[int, ...] = ()
    """Tokens it generated before (a request resumed after its rank was lost): prefilled after
    the prompt, and the next token sampled is number len(generated) of the request."""


@dataclass(frozen=True)
class Chunk:
    """One sequence's new tokens this step: a prompt chunk, or its last sampled token."""

    request_id: str
    rank: int
    start: int
    """Position of the first new token: how many of its tokens the rank has cached."""
    length: int
    sample: bool
    """Whether the step ends with a sampled token (the prompt is complete, or decoding)."""


class PrefixCopy(NamedTuple):
    """Copy the K/V of `source`'s first `tokens` positions into `target` (same rank): a sibling
    choice of `n` starts where the shared prompt's prefill left it."""

    source: str
    target: str
    tokens: int


@dataclass(frozen=True)
class SwitchCommand:
    """A step's part of a plan switch: every rank does the same at the same step boundary, before
    the step's forward, so no rank is ever half-switched (`Leader` decides, `switch.commands`
    carries it out on each rank).

    start    switch to `plan`: in the `background` (every rank starts moving its experts and the
             old plan keeps serving), or blocking (the experts move now, serving waits); with
             `serve`, the layout served is that plan degraded to the ranks in the group
             (`moe_contract.elastic.degraded_plan`; the same version: a rank back)
    poll     a background switch is in flight: every rank reports its transfer's state
    flip     every rank's experts landed: all serve plan `version` from now on
    abandon  a rank failed or the switch timed out (`reason`): all drop it
    """

    action: SwitchAction
    plan: Plan | None = None
    background: bool = False
    version: int | None = None
    reason: str | None = None
    serve: Plan | None = None

    @classmethod
    def start(cls, plan: Plan, *, background: bool, serve: Plan | None = None) -> SwitchCommand:
        return cls("start", plan=plan, background=background, serve=serve)

    @classmethod
    def poll(cls) -> SwitchCommand:
        return cls("poll")

    @classmethod
    def flip(cls, version: int) -> SwitchCommand:
        return cls("flip", version=version)

    @classmethod
    def abandon(cls, reason: str) -> SwitchCommand:
        return cls("abandon", reason=reason)

    @property
    def reports(self) -> bool:
        """Every rank reports its transfer's state in its result (a background switch)."""
        return self.action == "poll" or (self.action == "start" and self.background)

    def to_document(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "plan": None if self.plan is None else self.plan.to_document(),
            "background": self.background,
            "version": self.version,
            "reason": self.reason,
            "serve": None if self.serve is None else self.serve.to_document(),
        }

    @classmethod
    def from_document(cls, raw: dict[str, Any]) -> SwitchCommand:
        plan, serve = raw["plan"], raw.get("serve")
        return cls(
            action=raw["action"],
            plan=None if plan is None else parse_plan(plan),
            background=raw["background"],
            version=raw["version"],
            reason=raw["reason"],
            serve=None if serve is None else parse_plan(serve),
        )


@dataclass(frozen=True)
class StepDescriptor:
    step: int
    stop: bool = False
    release: tuple[str, ...] = ()
    """Finished, aborted or failed sequences: their ranks free them first."""
    switch: SwitchCommand | None = None
    """This step's part of a plan switch, done by every rank before the step's forward."""
    admit: tuple[NewSequence, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    two_batch: bool = False
    """Run the forward as two overlapped micro-batches (the same on every rank)."""
    copies: tuple[PrefixCopy, ...] = ()
    """Prompt K/V copied between sibling sequences of one rank, first of all (before the
    releases: a source may be released in the same step)."""

    @property
    def idle(self) -> bool:
        """Nothing but keeping the group alive."""
        switching = self.switch is not None
        work = self.release or self.admit or self.chunks or self.copies
        return not (self.stop or switching or work)

    @property
    def gathers(self) -> bool:
        """Ranks answer a StepResult (tokens, errors of admissions and chunks, switch state):
        every step that does something, so that the leader knows every rank did it (a step is
        committed when the leader has every rank's result: what a lost member's survivors
        keep)."""
        return not (self.idle or self.stop)

    def to_json(self) -> str:
        # By hand: dataclasses.asdict deep-copies every field, a measurable cost per step.
        document = {
            "step": self.step,
            "stop": self.stop,
            "release": self.release,
            "switch": None if self.switch is None else self.switch.to_document(),
            "admit": [_new_sequence_document(new) for new in self.admit],
            "chunks": [(c.request_id, c.rank, c.start, c.length, c.sample) for c in self.chunks],
            "two_batch": self.two_batch,
            "copies": self.copies,
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepDescriptor:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            step=raw["step"],
            stop=raw["stop"],
            release=tuple(raw["release"]),
            switch=None if raw["switch"] is None else SwitchCommand.from_document(raw["switch"]),
            admit=tuple(_new_sequence(item) for item in raw["admit"]),
            chunks=tuple(Chunk(*item) for item in raw["chunks"]),
            two_batch=raw["two_batch"],
            copies=tuple(PrefixCopy(*item) for item in raw.get("copies", ())),
        )


def _new_sequence_document(new: NewSequence) -> dict[str, Any]:
    return {
        "request_id": new.request_id,
        "rank": new.rank,
        "prompt_token_ids": new.prompt_token_ids,
        "sampling": dataclasses.asdict(new.sampling),
        "seed": new.seed,
        "reserve_tokens": new.reserve_tokens,
        "generated": new.generated,
    }


def _new_sequence(raw: dict[str, Any]) -> NewSequence:
    sampling = dict(raw["sampling"])
    sampling["stop_token_ids"] = tuple(sampling["stop_token_ids"])
    return NewSequence(
        request_id=raw["request_id"],
        rank=raw["rank"],
        prompt_token_ids=tuple(raw["prompt_token_ids"]),
        sampling=SamplingParams(**sampling),
        seed=raw["seed"],
        reserve_tokens=raw["reserve_tokens"],
        generated=tuple(raw.get("generated", ())),
    )


@dataclass(frozen=True)
class StepResult:
    """One rank's answer: (request id, sampled token), (request id, why it failed), the
    state of its background switch transfer, if one is in flight, and the log-probabilities
    the requests asked for (computed on this rank, which holds the logits)."""

    tokens: tuple[tuple[str, int], ...] = ()
    errors: tuple[tuple[str, str], ...] = ()
    switch: str | None = None
    """`pending`, `done`, or `failed: <why>`."""
    logprobs: tuple[tuple[str, TokenLogprob], ...] = ()
    """(request id, its sampled token's log-probabilities), for requests that asked."""
    prompt_logprobs: tuple[tuple[str, int, tuple[TokenLogprob, ...]], ...] = ()
    """(request id, position of the first, the prompt tokens' log-probabilities) of the
    prompt positions this step's chunk predicted, for requests that asked."""

    def to_json(self) -> str:
        document = {
            "tokens": self.tokens,
            "errors": self.errors,
            "switch": self.switch,
            "logprobs": [(rid, _logprob_document(lp)) for rid, lp in self.logprobs],
            "prompt_logprobs": [
                (rid, start, [_logprob_document(lp) for lp in entries])
                for rid, start, entries in self.prompt_logprobs
            ],
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepResult:
        raw = json.loads(text)
        return cls(
            tokens=tuple((str(r), int(t)) for r, t in raw["tokens"]),
            errors=tuple((str(r), str(e)) for r, e in raw["errors"]),
            switch=raw.get("switch"),
            logprobs=tuple((str(r), _logprob(lp)) for r, lp in raw.get("logprobs", ())),
            prompt_logprobs=tuple(
                (str(r), int(start), tuple(_logprob(lp) for lp in entries))
                for r, start, entries in raw.get("prompt_logprobs", ())
            ),
        )


def _logprob_document(lp: TokenLogprob) -> tuple[float, tuple[tuple[int, float], ...]]:
    return (lp.logprob, lp.top)


def _logprob(raw: list[Any]) -> TokenLogprob:
    logprob, top = raw
    return TokenLogprob(float(logprob), tuple((int(t), float(p)) for t, p in top))
