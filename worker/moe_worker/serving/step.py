"""What the leader tells every rank at a step boundary, and what each rank answers. Torch-free.

The leader's scheduler decides a step (`StepDescriptor`): sequences to release, a plan to switch
to, new sequences and the rank that keeps each, and every rank's work (`Chunk`: a prompt chunk or
one decode token per sequence). It travels to all ranks as JSON, plain data and never pickled
objects, so every rank runs the same collectives in the same order: a plan switch when there is
a plan, one forward when ANY rank has work (a rank without work joins with zero tokens). Each
rank answers a `StepResult` (its sampled tokens and the requests it failed), gathered by the
leader.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from moe_worker.serving.generation import SamplingParams


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


@dataclass(frozen=True)
class StepDescriptor:
    step: int
    stop: bool = False
    release: tuple[str, ...] = ()
    """Finished, aborted or failed sequences: their ranks free them first."""
    plan_json: str | None = None
    """A plan every rank switches to at this boundary, before the step's forward; with
    background switches, every rank starts moving its experts and the old plan keeps serving."""
    admit: tuple[NewSequence, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    flip: int | None = None
    """Background switch: every rank's experts landed, all flip to this plan version now."""
    abandon: str | None = None
    """Background switch: a rank failed or the switch timed out (the reason); all drop it."""
    poll_switch: bool = False
    """Background switch in flight: every rank reports its transfer's state in its result."""
    two_batch: bool = False
    """Run the forward as two overlapped micro-batches (the same on every rank)."""

    @property
    def idle(self) -> bool:
        """Nothing but keeping the group alive."""
        switching = self.plan_json or self.flip is not None or self.abandon or self.poll_switch
        return not (self.stop or self.release or switching or self.admit or self.chunks)

    @property
    def gathers(self) -> bool:
        """Ranks answer a StepResult (tokens, errors of admissions and chunks, switch state)."""
        return bool(self.admit or self.chunks or self.poll_switch)

    def to_json(self) -> str:
        # By hand: dataclasses.asdict deep-copies every field, a measurable cost per step.
        document = {
            "step": self.step,
            "stop": self.stop,
            "release": self.release,
            "plan_json": self.plan_json,
            "flip": self.flip,
            "abandon": self.abandon,
            "poll_switch": self.poll_switch,
            "admit": [_new_sequence_document(new) for new in self.admit],
            "chunks": [(c.request_id, c.rank, c.start, c.length, c.sample) for c in self.chunks],
            "two_batch": self.two_batch,
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepDescriptor:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            step=raw["step"],
            stop=raw["stop"],
            release=tuple(raw["release"]),
            plan_json=raw["plan_json"],
            flip=raw["flip"],
            abandon=raw["abandon"],
            poll_switch=raw["poll_switch"],
            admit=tuple(_new_sequence(item) for item in raw["admit"]),
            chunks=tuple(Chunk(*item) for item in raw["chunks"]),
            two_batch=raw["two_batch"],
        )


def _new_sequence_document(new: NewSequence) -> dict[str, Any]:
    return {
        "request_id": new.request_id,
        "rank": new.rank,
        "prompt_token_ids": new.prompt_token_ids,
        "sampling": dataclasses.asdict(new.sampling),
        "seed": new.seed,
        "reserve_tokens": new.reserve_tokens,
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
    )


@dataclass(frozen=True)
class StepResult:
    """One rank's answer: (request id, sampled token), (request id, why it failed), and the
    state of its background switch transfer, if one is in flight."""

    tokens: tuple[tuple[str, int], ...] = ()
    errors: tuple[tuple[str, str], ...] = ()
    switch: str | None = None
    """`pending`, `done`, or `failed: <why>`."""

    def to_json(self) -> str:
        document = {"tokens": self.tokens, "errors": self.errors, "switch": self.switch}
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StepResult:
        raw = json.loads(text)
        return cls(
            tokens=tuple((str(r), int(t)) for r, t in raw["tokens"]),
            errors=tuple((str(r), str(e)) for r, e in raw["errors"]),
            switch=raw.get("switch"),
        )
