"""Issue 19: a request's prompts and parameters go to the rank that keeps each sequence, once,
and never to the others. Three forked gloo ranks serve the largest request the API admits (64
prompts, 256 stop token ids each) beside a small one; every rank records what reached it: the
broadcast step descriptors and the admissions sent to it alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_harness import run_world
from worker_serving_cases import Driver, greedy, serve_group

from moe_contract.shape import ModelShape
from moe_worker.api.limits import MAX_PROMPTS, MAX_STOP_TOKEN_IDS
from moe_worker.bench.generator import Generator, Request
from moe_worker.ep import group
from moe_worker.ep.runner import ModelRunner
from moe_worker.models.weights import SyntheticWeights
from moe_worker.serving.generation import SamplingParams
from moe_worker.serving.step import NewSequence
from moe_worker.settings import WorkerSettings

pytestmark = pytest.mark.distributed

WORLD = 3
SHAPE = ModelShape(
    layers=2, experts=6, hidden=32, ffn_hidden=48, heads=4, head_dim=8, kv_heads=2, vocab_size=80
)
SETTINGS = WorkerSettings(
    model=SHAPE, seed=11, kv_cache_tokens=512, max_batch_tokens=16, max_queued_requests=100
)
STOPS = tuple(range(1000, 1000 + MAX_STOP_TOKEN_IDS))
"""Outside the vocabulary: never sampled, so every sequence runs its max_tokens."""
LARGE = [
    (
        (3 + i % 50, 4, 5 + i % 7),
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=3, stop_token_ids=STOPS),
    )
    for i in range(MAX_PROMPTS)
]
SMALL = greedy((5, 6, 7), 5)


def lead(driver: Driver) -> dict[str, Any]:
    alone = driver.run([SMALL])[0]
    small = driver.submit(*SMALL)
    large = [driver.submit(*request) for request in LARGE]
    for outcome in (small, *large):
        assert outcome.done.wait(300), "a request never finished"
    return {
        "alone": alone.tokens,
        "small": (small.tokens, small.finish),
        "large": [(o.tokens, o.finish) for o in large],
    }


def recording_rank(rank: int, world: int) -> dict[str, Any]:
    """Serve, recording what reached this rank (this forked process only)."""
    seen: dict[str, list[Any]] = {"broadcast": [], "received": [], "admitted": []}
    broadcast_text, recv_text, admit = group.broadcast_text, group.recv_text, ModelRunner.admit

    def broadcast(text: str | None, *args: Any, **kwargs: Any) -> str:
        got = broadcast_text(text, *args, **kwargs)
        if '"admit":[[' in got:  # a step that admits (the others are alike)
            seen["broadcast"].append(got)
        return got

    def received(*args: Any, **kwargs: Any) -> str:
        got = recv_text(*args, **kwargs)
        seen["received"].append(got)
        return got

    def admitting(self: ModelRunner, new: list[NewSequence]) -> list[tuple[str, str]]:
        seen["admitted"] += [(n.request_id, n.rank, len(n.sampling.stop_token_ids)) for n in new]
        return admit(self, new)

    group.broadcast_text, group.recv_text = broadcast, received  # type: ignore[assignment]
    ModelRunner.admit = admitting  # type: ignore[method-assign]
    return {**serve_group(rank, world, SETTINGS, lead), "seen": seen}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_world(recording_rank, WORLD, Path(tmp_path_factory.mktemp("ranks")), 300)


def generated(requests: list[tuple[tuple[int, ...], SamplingParams]]) -> list[list[int]]:
    torch.set_num_threads(1)
    source = SyntheticWeights.for_shape(SHAPE, seed=11)
    batch = [Request(f"r{i}", prompt, params) for i, (prompt, params) in enumerate(requests)]
    out = Generator.from_source(source, 512).generate(batch)
    return [out[f"r{i}"].token_ids for i in range(len(requests))]


def test_the_largest_request_and_a_small_one_beside_it_are_served_as_alone(
    ranks: list[dict[str, Any]],
) -> None:
    leader = ranks[0]
    (small,) = generated([SMALL])
    assert leader["alone"] == small and leader["small"] == [small, "length"]
    assert [tokens for tokens, _ in leader["large"]] == generated(LARGE)
    assert {finish for _, finish in leader["large"]} == {"length"}


def test_only_the_owner_receives_an_admission_and_the_step_names_it(
    ranks: list[dict[str, Any]],
) -> None:
    owners: dict[str, int] = {}
    for rank, result in enumerate(ranks):
        seen = result["seen"]
        assert {owner for _, owner, _ in seen["admitted"]} == {rank}, "another rank's sequence"
        owners.update({rid: owner for rid, owner, _ in seen["admitted"]})
        assert MAX_STOP_TOKEN_IDS in {stops for _, _, stops in seen["admitted"]}
        for text in seen["broadcast"]:  # ids and ranks only: no prompt, no stop id
            assert "sampling" not in text and str(STOPS[-1]) not in text, text[:200]
        sent_here = [new for text in seen["received"] for new in json.loads(text)]
        assert {new["rank"] for new in sent_here} <= {rank}
        if rank != 0:
            assert sorted(new["request_id"] for new in sent_here) == sorted(
                rid for rid, owner in owners.items() if owner == rank
            )
    assert len(owners) == 2 + MAX_PROMPTS and set(owners.values()) == set(range(WORLD))
    named = {rid for text in ranks[1]["seen"]["broadcast"] for rid, _ in json.loads(text)["admit"]}
    assert named == set(owners)  # every rank learns every admission's id and rank
