"""Single-process properties of the EP data path: the grouped GEMM over stacked slots equals the
per-expert reference (both kernels), the stacks follow a plan switch (slots rewritten, grown,
shrunk), two micro-batches split and merge back in order, and an overlapped forward equals one
batch."""

from __future__ import annotations

import pytest
import torch

from moe_contract.plan import Plan, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import ep_prefill
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.slots import SlotStacks
from moe_worker.ep.two_batch import interleave, last_rows, split_items
from moe_worker.models import ExpertWeights
from moe_worker.models.grouped import SlotGroups, choose_kernel, grouped_mm_works
from moe_worker.models.weights import SyntheticWeights
from moe_worker.switch.mover import ExpertMover

SHAPE = ModelShape(layers=2, experts=4, hidden=16, ffn_hidden=32, heads=2, head_dim=8, top_k=2)
KERNELS = ["loop"] + (["grouped_mm"] if grouped_mm_works("cpu", torch.float32) else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["SeedMLP", "Mixtral", "Qwen3MoE"])
def test_the_grouped_gemm_equals_each_expert_on_its_rows(name: str, kernel: str) -> None:
    source = SyntheticWeights.for_shape(SHAPE.replace(architecture=name), seed=2)
    arch = source.arch
    experts = [source.expert(0, e) for e in (3, 0, 1)]  # slots 0..2; slot 1 gets no rows
    stacks = SlotStacks.build(
        [(3, 0, 1)], dict(zip([(0, 3), (0, 0), (0, 1)], experts, strict=True))
    )
    sizes = [5, 0, 3]
    x_nD = torch.randn(8, SHAPE.hidden)
    got = arch.grouped_forward(x_nD, stacks.layer(0), SlotGroups.of(sizes, kernel))
    parts = x_nD.split(sizes)
    expected = torch.cat([arch.expert_forward(p, w) for p, w in zip(parts, experts, strict=True)])
    # Within fp32 rounding: a slot of few rows runs as W @ x.T (grouped.FEW_ROWS), not x @ W.T.
    torch.testing.assert_close(got, expected)
    empty = arch.grouped_forward(x_nD[:0], stacks.layer(0), SlotGroups.of([0, 0, 0], kernel))
    assert empty.shape == (0, SHAPE.hidden)


def test_cpu_takes_the_loop_unless_asked() -> None:
    assert choose_kernel(torch.device("cpu"), torch.float32) == "loop"
    with pytest.raises(ValueError, match="auto, grouped_mm, loop"):
        choose_kernel(torch.device("cpu"), torch.float32, "fast")


def expert(value: float) -> ExpertWeights:
    return ExpertWeights((torch.full((3, 2), value), torch.full((2, 3), -value)))


def test_stacks_follow_a_switch_in_place_and_when_slots_grow_or_shrink() -> None:
    weights = {(0, e): expert(e) for e in range(4)} | {(1, e): expert(10 + e) for e in range(4)}
    stacks = SlotStacks.build([(0, 1), (2, 3)], weights)
    before = stacks.layer(0)[0]
    # Layer 0 swaps its slots (each source is the other's target); layer 1 grows to three.
    stacks.flip([(1, 0), (3, 2, 0)], {(1, 0): expert(10).matrices})
    assert stacks.layer(0)[0] is before  # same slot count: rewritten in place
    assert [float(m[0, 0]) for m in stacks.layer(0)[0]] == [1.0, 0.0]
    assert [float(m[0, 0]) for m in stacks.layer(1)[0]] == [13.0, 12.0, 10.0]
    assert stacks.experts(1) == (3, 2, 0) and stacks.held() == [{0, 1}, {0, 2, 3}]
    stacks.flip([(1,), (0,)], {})
    assert stacks.layer(1)[0].shape == (1, 3, 2) and float(stacks.layer(1)[0][0, 0, 0]) == 10.0
    assert stacks.matrices(0, 1)[0].is_contiguous()


def test_two_micro_batches_split_by_tokens_and_merge_back_in_order() -> None:
    items = [("a", [1, 2, 3], 0), ("b", [4], 7), ("c", [5, 6, 7, 8, 9, 10], 2), ("d", [11], 3)]
    first, second = split_items(items)
    assert first == [("a", [1, 2, 3], 0), ("b", [4], 7), ("c", [5, 6], 2)]
    assert second == [("c", [7, 8, 9, 10], 4), ("d", [11], 3)]
    assert last_rows(items, (first, second)) == [0, 1, 3, 4]
    assert split_items([("x", [1], 0)]) == ([("x", [1], 0)], [])
    assert split_items([]) == ([], [])


def test_micro_batches_take_turns_up_to_each_collective() -> None:
    order: list[str] = []

    def steps(name: str, turns: int):  # type: ignore[no-untyped-def]
        for turn in range(turns):
            order.append(f"{name}{turn}")
            yield
        return name

    assert interleave([steps("a", 2), steps("b", 2)]) == ["a", "b"]
    assert order == ["a0", "b0", "a1", "b1"]


@pytest.mark.parametrize("name", ["SeedMLP", "Qwen3MoE"])
def test_an_overlapped_forward_equals_one_batch(name: str) -> None:
    source = SyntheticWeights.for_shape(SHAPE.replace(architecture=name), seed=1)
    plan = round_robin_plan(2, 4, 1, slots_per_rank=5)
    engine = EPEngine(source, plan, rank=0)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [7, 8, 7]]  # the first prompt is cut in two
    one = ep_prefill(engine, prompts, torch.device("cpu"))
    two = ep_prefill(engine, prompts, torch.device("cpu"), two_batch=True)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)
    assert engine.counts_LE.sum() == 2 * 2 * 2 * 11  # both runs, 2 layers, top-2, 11 tokens


def test_a_blocking_switch_at_world_1_rewrites_the_stacks() -> None:
    source = SyntheticWeights.for_shape(SHAPE, seed=1)
    engine = EPEngine(source, round_robin_plan(2, 4, 1, slots_per_rank=4), rank=0)
    prompts = [[1, 2, 3], [4, 5]]
    expected = ep_prefill(engine, prompts, torch.device("cpu"))
    reversed_slots = tuple(((*reversed(layer[0]), 0),) for layer in engine.plan.slots)
    assert ExpertMover(engine).apply(Plan(version=2, slotsPerRank=5, slots=reversed_slots)) == 0
    assert engine.stacks.experts(0) == (3, 2, 1, 0, 0)
    torch.testing.assert_close(ep_prefill(engine, prompts, torch.device("cpu")), expected)
