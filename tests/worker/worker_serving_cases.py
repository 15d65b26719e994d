"""Rank bodies of the serving tests (imported by name): an EP group serving a checkpoint, driven
through the leader's Backend in the same process as rank 0 (`run_world` forks the ranks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_contract.plan import Plan, round_robin_plan
from moe_worker.bench.data_path import ep_prefill
from moe_worker.ep.engine import EPEngine
from moe_worker.runtime.initial_plan import read_initial_plan
from moe_worker.runtime.loading import open_weights
from moe_worker.runtime.rank import Runtime
from moe_worker.serving.generation import GenerationRequest, SamplingParams, TokenEvent
from moe_worker.settings import WorkerSettings


@dataclass
class Outcome:
    """Everything one request received."""

    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: TokenEvent) -> None:
        self.tokens.extend(event.token_ids)
        if event.finish_reason is not None:
            self.finish, self.error = event.finish_reason, event.error
            self.done.set()


def greedy(prompt: Iterable[int], max_tokens: int) -> tuple[tuple[int, ...], SamplingParams]:
    return tuple(prompt), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


class Driver:
    """The leader's side of a test: submit requests, wait for them, switch plans."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime, self.backend = runtime, runtime.backend
        self._ids = 0

    def submit(self, prompt: tuple[int, ...], params: SamplingParams) -> Outcome:
        self._ids += 1
        outcome = Outcome(f"req-{self._ids}")
        request = GenerationRequest(outcome.request_id, prompt, params)
        self.backend.submit(request, outcome.sink)
        return outcome

    def run(self, requests: list[tuple[tuple[int, ...], SamplingParams]]) -> list[Outcome]:
        outcomes = [self.submit(p, s) for p, s in requests]
        for outcome in outcomes:
            assert outcome.done.wait(300), "a request never finished"
        return outcomes


def replace_plan(plan: Plan, version: int, experts: int) -> Plan:
    """A Replace plan that moves experts: one more slot per rank (replicas), ranks rotated."""
    grown = round_robin_plan(plan.num_layers, experts, plan.world_size, plan.slots_per_rank + 1)
    slots = tuple(layer[1:] + layer[:1] for layer in grown.slots)
    return Plan(version=version, slotsPerRank=grown.slots_per_rank, slots=slots, method="Replace")


def serve_group(
    rank: int,
    world: int,
    settings: WorkerSettings,
    lead: Callable[[Driver], dict[str, Any]],
    before: Callable[[EPEngine, int, int], dict[str, Any]] | None = None,
    expect_failure: bool = False,
) -> dict[str, Any]:
    """Every rank serves `settings` (checkpoint or synthetic); rank 0 also runs `lead`.

    `before(engine, rank, world)` runs first on every rank, collectively, on a bare EP engine of
    the same weights and initial plan (for logits, which the serving loop does not expose).
    `expect_failure`: the serving loop is meant to fail; rank 0 reports why in `failure`.
    """
    source, settings = open_weights(settings.replace(rank=rank, world_size=world, device="cpu"))
    results: dict[str, Any] = {}
    if before is not None:
        engine = EPEngine(source, read_initial_plan(settings), rank=rank)
        results.update(before(engine, rank, world))
        del engine
    runtime = Runtime(settings, source)
    if rank != 0:
        runtime.run()
        return results
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            runtime.run()
        except BaseException as error:  # reported by the test
            failure.append(error)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not runtime.backend.is_ready():
            assert not failure and time.monotonic() < deadline, f"never ready: {failure}"
            time.sleep(0.02)
        results.update(lead(Driver(runtime)))
    finally:
        runtime.stop()
        thread.join()
    if expect_failure:
        results["failure"] = repr(failure[0]) if failure else None
    else:
        assert not failure, failure
    return results


def logits_of(prompts: list[list[int]]) -> Callable[[EPEngine, int, int], dict[str, Any]]:
    """EP logits at each prompt's last token, in one batch and as two overlapped micro-batches;
    rank r runs prompts r, r + world, ..."""

    def body(engine: EPEngine, rank: int, world: int) -> dict[str, Any]:
        mine = list(range(rank, len(prompts), world))
        results = {}
        for key, two_batch in (("logits", False), ("logits_two_batch", True)):
            got = ep_prefill(engine, [prompts[i] for i in mine], torch.device("cpu"), two_batch)
            results[key] = {i: got[row].tolist() for row, i in enumerate(mine)}
        return results

    return body
