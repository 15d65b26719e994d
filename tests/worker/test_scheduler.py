"""The leader's scheduler as pure logic: admission, the KV budget mirror, chunked prefill, the
queue bound and the 400 / 429 conditions, fairness, finishing, aborts and failures. A simulated
group of ranks (block allocators fed exactly what the step descriptors say) checks every step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import round_robin_plan
from moe_worker.serving.blocks import BlockAllocator
from moe_worker.serving.generation import (
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
from moe_worker.serving.scheduler import Scheduled, Scheduler, SchedulerConfig
from moe_worker.serving.step import (
    NewSequence,
    StepDescriptor,
    StepResult,
    SwitchCommand,
    admitted,
    sequences_from_json,
    sequences_to_json,
)

EOS = 7


def config(**changes: object) -> SchedulerConfig:
    base = {
        "world_size": 2,
        "kv_cache_tokens": 64,
        "max_context": 48,
        "vocab_size": 100,
        "eos_token_ids": (EOS,),
        "block_size": 16,
        "max_batch_tokens": 8,
        "max_queued_requests": 4,
    }
    return SchedulerConfig(**{**base, **changes})  # type: ignore[arg-type]


def request(rid: str, prompt: int, max_tokens: int = 4, **sampling: object) -> GenerationRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **sampling)  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(range(10, 10 + prompt)), params)


@dataclass
class Group:
    """Simulated ranks: their block allocators and cached lengths, driven by the descriptors."""

    scheduler: Scheduler
    token: Callable[[str, int], int] = lambda rid, index: 1
    events: dict[str, list[TokenEvent]] = field(default_factory=dict)
    steps: list[Scheduled] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.scheduler.config
        self.ranks = [
            BlockAllocator(c.kv_cache_tokens // c.block_size, c.block_size)
            for _ in range(c.world_size)
        ]
        self.cached: dict[str, int] = {}
        self.generated: dict[str, int] = {}

    def submit(self, req: GenerationRequest) -> None:
        self.scheduler.add(req, lambda e: self.events.setdefault(e.request_id, []).append(e))

    def step(self) -> Scheduled:
        c = self.scheduler.config
        s = self.scheduler.schedule()
        self.steps.append(s)
        for sink, event in s.deliveries:
            sink(event)
        for rid in s.release:
            for rank in self.ranks:
                rank.free(rid)
            self.cached.pop(rid, None)
        for new in s.admit:
            self.ranks[new.rank].reserve(new.request_id, new.reserve_tokens)
            self.cached[new.request_id] = 0
        results = [StepResult() for _ in range(c.world_size)]
        per_rank = [0] * c.world_size
        tokens: list[list[tuple[str, int]]] = [[] for _ in range(c.world_size)]
        errors: list[list[tuple[str, str]]] = [[] for _ in range(c.world_size)]
        for chunk in s.chunks:
            assert chunk.start == self.cached[chunk.request_id], "leader and rank disagree"
            assert chunk.request_id in self.ranks[chunk.rank]
            self.cached[chunk.request_id] += chunk.length
            per_rank[chunk.rank] += chunk.length
            if chunk.request_id in self.fail:
                errors[chunk.rank].append((chunk.request_id, self.fail[chunk.request_id]))
            elif chunk.sample:
                index = self.generated.get(chunk.request_id, 0)
                self.generated[chunk.request_id] = index + 1
                tokens[chunk.rank].append((chunk.request_id, self.token(chunk.request_id, index)))
        assert all(n <= c.max_batch_tokens for n in per_rank)
        for rank, allocator in enumerate(self.ranks):  # the mirror is exact
            assert allocator.free_tokens == self.scheduler.free_tokens(rank)
        results = [StepResult(tuple(t), tuple(e)) for t, e in zip(tokens, errors, strict=True)]
        for sink, event in self.scheduler.complete(results):
            sink(event)
        return s

    def run(self, limit: int = 500) -> None:
        for _ in range(limit):
            if not self.scheduler.has_work:
                return
            self.step()
        raise AssertionError("the scheduler never finished")

    def tokens(self, rid: str) -> list[int]:
        return [t for e in self.events[rid] for t in e.token_ids]

    def finish(self, rid: str) -> str | None:
        return self.events[rid][-1].finish_reason


def test_requests_spread_over_the_ranks_with_most_free_budget() -> None:
    group = Group(Scheduler(config()))
    group.submit(request("a", 20, 8))  # 28 tokens: 2 blocks
    group.submit(request("b", 4, 4))
    group.submit(request("c", 4, 4))
    first = group.step()
    assert [(n.request_id, n.rank) for n in first.admit] == [("a", 0), ("b", 1), ("c", 1)]
    assert [n.reserve_tokens for n in first.admit] == [28, 8, 8]
    group.run()
    assert all(group.finish(r) == "length" for r in "abc")
    assert all(len(group.tokens(r)) == n for r, n in (("a", 8), ("b", 4), ("c", 4)))


def test_prompts_are_chunked_within_the_step_budget_and_decodes_go_first() -> None:
    group = Group(Scheduler(config(world_size=1, max_batch_tokens=8)))
    group.submit(request("short", 3, 5))
    group.step()
    group.submit(request("long", 20, 2))
    steps = [group.step() for _ in range(3)]
    shapes = [[(c.request_id, c.start, c.length, c.sample) for c in s.chunks] for s in steps]
    assert shapes[0] == [("short", 3, 1, True), ("long", 0, 7, False)]
    assert shapes[1] == [("short", 4, 1, True), ("long", 7, 7, False)]
    assert shapes[2] == [("short", 5, 1, True), ("long", 14, 6, True)]
    group.run()
    assert group.tokens("long") == [1, 1]


def test_finish_at_eos_stop_tokens_and_max_tokens() -> None:
    group = Group(Scheduler(config()), token=lambda rid, i: {"eos": EOS, "stop": 42}.get(rid, 3))
    group.submit(request("eos", 2, 6))
    group.submit(request("stop", 2, 6, stop_token_ids=(42,)))
    group.submit(request("ignore", 2, 3, ignore_eos=True))
    group.run()
    assert (group.tokens("eos"), group.finish("eos")) == ([EOS], "stop")
    assert (group.tokens("stop"), group.finish("stop")) == ([42], "stop")
    assert (group.tokens("ignore"), group.finish("ignore")) == ([3, 3, 3], "length")
    eos_ignored = Group(Scheduler(config()), token=lambda rid, i: EOS)
    eos_ignored.submit(request("x", 2, 3, ignore_eos=True))
    eos_ignored.run()
    assert eos_ignored.tokens("x") == [EOS] * 3


@pytest.mark.parametrize(
    ("req", "param", "words"),
    [
        (request("a", 40, 9), "max_tokens", "context length of 48"),
        (request("a", 40, 30), "max_tokens", "max_tokens (30)"),
        (GenerationRequest("a", ()), "prompt", "at least one token"),
        (GenerationRequest("a", (1, 100)), "prompt", "outside the vocabulary"),
    ],
)
def test_impossible_requests_are_invalid_and_name_the_parameter(
    req: GenerationRequest, param: str, words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        Scheduler(config()).add(req, lambda e: None)
    assert e.value.param == param and e.value.status == 400


def test_more_than_a_whole_rank_budget_is_invalid_even_within_the_context() -> None:
    scheduler = Scheduler(config(kv_cache_tokens=32, max_context=48))
    with pytest.raises(InvalidRequest, match="whole KV cache of 32 tokens") as error:
        scheduler.add(request("a", 30, 4), lambda e: None)
    assert error.value.param == "max_tokens"


def test_the_waiting_queue_is_bounded_and_a_full_one_is_a_429() -> None:
    group = Group(Scheduler(config(world_size=1, kv_cache_tokens=32, max_queued_requests=2)))
    group.submit(request("running", 20, 8))  # takes the whole budget once admitted
    group.step()
    group.submit(request("w1", 4))
    group.submit(request("w2", 4))
    with pytest.raises(QueueFull) as error:
        group.submit(request("w3", 4))
    assert error.value.status == 429
    with pytest.raises(InvalidRequest, match="already being served"):
        group.submit(request("w1", 4))
    group.run()
    assert all(group.finish(r) == "length" for r in ("running", "w1", "w2"))
    group.submit(request("w3", 4))  # room again
    group.run()


def test_first_come_first_served_a_long_request_is_not_starved() -> None:
    group = Group(Scheduler(config(world_size=1, kv_cache_tokens=64, max_queued_requests=10)))
    group.submit(request("s0", 10, 6))  # 16 tokens
    group.submit(request("s1", 10, 6))
    admitted = [n.request_id for n in group.step().admit]
    group.submit(request("big", 40, 8))  # 48 tokens: waits for both to finish
    group.submit(request("s2", 10, 6))  # would fit now, but waits behind "big"
    group.step()
    assert group.scheduler.waiting == 2
    while group.scheduler.has_work:
        admitted += [n.request_id for n in group.step().admit]
    assert admitted == ["s0", "s1", "big", "s2"]


def test_a_rank_keeps_at_most_max_batch_tokens_sequences() -> None:
    c = config(world_size=1, kv_cache_tokens=256, max_batch_tokens=3, max_queued_requests=8)
    group = Group(Scheduler(c))
    for i in range(5):
        group.submit(request(f"r{i}", 1, 4))
    first = group.step()
    assert len(first.admit) == 3 and group.scheduler.waiting == 2
    group.run()
    assert all(group.finish(f"r{i}") == "length" for i in range(5))


def test_aborts_of_waiting_and_running_requests() -> None:
    group = Group(Scheduler(config(world_size=1, kv_cache_tokens=32)))
    group.submit(request("running", 10, 20))
    group.step()
    group.submit(request("waiting", 10, 20))
    group.scheduler.abort("waiting")
    group.scheduler.abort("nobody")
    group.step()
    assert group.events["waiting"] == [TokenEvent("waiting", (), "abort")]
    group.scheduler.abort("running")
    released = group.step().release
    assert group.finish("running") == "abort" and released == ("running",)
    group.run()
    assert group.scheduler.free_tokens(0) == 32


def test_a_rank_failing_a_request_ends_only_that_request() -> None:
    group = Group(Scheduler(config()), fail={"bad": "RuntimeError: boom"})
    group.submit(request("bad", 5))
    group.submit(request("good", 5))
    group.run()
    assert group.finish("bad") == "error" and group.events["bad"][-1].error == "RuntimeError: boom"
    assert group.finish("good") == "length" and len(group.tokens("good")) == 4


def test_a_token_the_rank_never_returned_fails_the_request() -> None:
    scheduler = Scheduler(config())
    events: list[TokenEvent] = []
    scheduler.add(request("a", 2), events.append)
    scheduler.schedule()
    for sink, event in scheduler.complete([StepResult(), StepResult()]):
        sink(event)
    assert events[-1].finish_reason == "error" and "no token" in (events[-1].error or "")
    scheduler.schedule()
    assert scheduler.free_tokens(0) == scheduler.free_tokens(1) == 64


def test_drain_ends_every_request() -> None:
    group = Group(Scheduler(config(world_size=1, kv_cache_tokens=16)))
    group.submit(request("running", 4, 8))
    group.step()
    group.submit(request("waiting", 4, 8))
    for sink, event in group.scheduler.drain("abort"):
        sink(event)
    assert group.finish("running") == group.finish("waiting") == "abort"
    group.run()
    assert group.scheduler.free_tokens(0) == 16


def test_seeds_are_kept_or_drawn() -> None:
    scheduler = Scheduler(config(), draw_seed=lambda: 1234)
    scheduler.add(request("a", 2, seed=5), lambda e: None)
    scheduler.add(request("b", 2), lambda e: None)
    assert [n.seed for n in scheduler.schedule().admit] == [5, 1234]


requests_strategy = st.lists(
    st.tuples(st.integers(1, 30), st.integers(1, 12), st.booleans(), st.booleans()),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    requests_strategy,
    st.integers(1, 3),
    st.integers(1, 12),
    st.sampled_from([32, 48, 64]),
)
def test_every_request_ends_once_and_the_budget_never_leaks(
    specs: list[tuple[int, int, bool, bool]], world: int, batch: int, kv: int
) -> None:
    c = config(world_size=world, max_batch_tokens=batch, kv_cache_tokens=kv, max_queued_requests=50)
    group = Group(Scheduler(c), token=lambda rid, i: EOS if rid.endswith("e") and i == 1 else 3)
    accepted = []
    for i, (prompt, max_tokens, abort, eos) in enumerate(specs):
        rid = f"r{i}" + ("e" if eos else "")
        try:
            group.submit(request(rid, prompt, max_tokens))
            accepted.append((rid, max_tokens, abort))
        except InvalidRequest as error:
            assert error.param == "max_tokens" and prompt + max_tokens > min(kv, 48)
        if abort:
            group.scheduler.abort(rid)
        group.step()
    group.run()
    for rid, max_tokens, _ in accepted:
        finishes = [e.finish_reason for e in group.events[rid] if e.finish_reason]
        assert len(finishes) == 1 and group.events[rid][-1].finish_reason == finishes[0]
        assert len(group.tokens(rid)) <= max_tokens
        if finishes[0] == "length":
            assert len(group.tokens(rid)) == max_tokens
    group.step()  # the last releases
    assert all(group.scheduler.free_tokens(r) == (kv // 16) * 16 for r in range(world))
    assert all(rank.free_tokens == (kv // 16) * 16 for rank in group.ranks)


def test_step_descriptors_and_results_travel_as_json_unchanged() -> None:
    scheduler = Scheduler(config(), draw_seed=lambda: 9)
    scheduler.add(request("a", 20, 4, top_p=0.5, stop_token_ids=(3, 4)), lambda e: None)
    scheduler.add(request("b", 2), lambda e: None)
    s = scheduler.schedule()
    switch = SwitchCommand.start(round_robin_plan(2, 4, 2, 2, version=2), background=True)
    descriptor = StepDescriptor(4, False, ("x",), switch, admitted(s.admit), s.admit, s.chunks)
    assert StepDescriptor.from_json(descriptor.to_json()) == descriptor
    assert StepDescriptor.from_json(StepDescriptor(5).to_json()).idle
    result = StepResult((("a", 5),), (("b", "KeyError: 'b'"),))
    assert StepResult.from_json(result.to_json()) == result


def ignore(event: TokenEvent) -> None:
    pass


def test_the_step_names_admissions_and_only_their_owner_receives_them_in_full() -> None:
    """Issue 19: a request's prompt and parameters (256 stop token ids) are not broadcast to
    every rank every step: the descriptor names each admission and its rank, the owner's
    payload carries every field of its own sequences and nothing of another rank's."""
    scheduler = Scheduler(config(), draw_seed=lambda: 9)
    stops = tuple(range(1000, 1256))
    scheduler.add(request("a", 20, 4, top_p=0.5, stop_token_ids=stops, logprobs=2), ignore)
    scheduler.add(request("b", 3, prompt_logprobs=1), ignore)
    admit = scheduler.schedule().admit
    resumed = NewSequence("c", 1, (5, 6), SamplingParams(seed=3), 3, 12, generated=(8, 9))
    descriptor = StepDescriptor(1, admit=admitted((*admit, resumed)), sequences=(*admit, resumed))

    wire = descriptor.to_json()
    assert "1255" not in wire and "prompt_token_ids" not in wire and "sampling" not in wire
    received = StepDescriptor.from_json(wire)
    assert received.admit == (("a", 0), ("b", 1), ("c", 1)) and received.sequences == ()
    assert not received.idle and received.gathers
    for rank in (0, 1):
        mine = descriptor.sequences_of(rank)
        assert {new.rank for new in mine} == {rank}
        assert sequences_from_json(sequences_to_json(mine)) == mine
    assert descriptor.sequences_of(1)[1].generated == (8, 9)
    assert descriptor.sequences_of(0)[0].sampling.stop_token_ids == stops
    assert "1255" not in sequences_to_json(descriptor.sequences_of(1))  # a's stop ids: rank 0's
