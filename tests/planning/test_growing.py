"""Growing slots per rank (`replace.grow_slots`, `replace_slots(slots_per_rank=...)`).

A grown layer's new slots copy experts their rank holds, so nothing moves between ranks, but a
copy takes a share of its expert's tokens from the other ranks that hold it: a rank that holds
one of four replicas carries 1/4 of the expert, with a copy two of seven. The kept fill copies
experts that add nothing where the rank holds one, and Replace never hands back a grown layer
that carries more than the current one.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moe_contract.plan import Plan, moved_experts
from moe_operator.planning import arrays
from moe_operator.planning.placement import rank_loads, replica_counts
from moe_operator.planning.replace import grow_slots, replace_slots

from .strategies import Case, cases

RELATIVE = 1e-9

SHARED = ((1, 0), (0, 1), (1, 0), (1, 0))
"""Both experts on every rank: a copy of expert 1 on three ranks made rank 0 carry 2/7 of it."""


def _case(slots: tuple, loads: tuple) -> Case:
    layer = slots[0]
    plan = Plan(version=1, slotsPerRank=len(layer[0]), slots=slots)
    return Case(len(slots), len(loads[0]), len(layer), len(layer[0]), plan, loads)


def _adds_nothing_somewhere(layer: tuple, loads: tuple[float, ...]) -> bool:
    """Whether every rank holds an expert without load or one whose replicas are all on it."""
    counts = replica_counts(layer, len(loads))
    return all(any(loads[e] == 0 or rank.count(e) == counts[e] for e in rank) for rank in layer)


@settings(max_examples=80, deadline=None)
@given(cases(max_ranks=6, max_slots=3), st.integers(0, 2))
@example(_case((SHARED,), ((0.0, 1.0),)), 1)
def test_grown_layers_copy_local_experts_and_the_kept_fill_keeps_rank_loads(
    case: Case, extra: int
) -> None:
    current = np.asarray(case.plan.slots, dtype=np.int64)
    load = np.asarray(case.loads)
    size = case.slots_per_rank + extra
    grown = grow_slots(current, load, size)
    for fill in (grown.kept, grown.hot):
        assert fill.shape == (case.layers, case.ranks, size)
        assert np.array_equal(fill[:, :, : case.slots_per_rank], current)
        assert not arrays.moved_experts(current, fill).any()  # only copies of local experts
    for layer, kept, loads in zip(case.plan.slots, grown.kept.tolist(), case.loads, strict=True):
        if _adds_nothing_somewhere(layer, loads):
            before, after = rank_loads(layer, loads), rank_loads(kept, loads)
            assert np.allclose(after, before, rtol=RELATIVE, atol=0)


@settings(max_examples=80, deadline=None)
@given(cases(max_ranks=5, max_slots=2), st.integers(1, 2))
@example(_case((SHARED,), ((0.0, 1.0),)), 1)
@example(_case((((0, 0), (0, 0), (1, 0)),), ((10.0, 2.0),)), 1)  # no candidate at 4.0 or less
def test_a_grown_layer_never_carries_more_than_the_current_one(case: Case, extra: int) -> None:
    size = case.slots_per_rank + extra
    result = replace_slots(case.plan.slots, case.loads, slots_per_rank=size)
    load = np.asarray(case.loads)
    kept = grow_slots(np.asarray(case.plan.slots, dtype=np.int64), load, size).kept
    assert result.slots.shape == (case.layers, case.ranks, size)
    after = arrays.imbalances(arrays.rank_loads(result.slots, load))
    assert np.array_equal(result.after, after)
    for layer, old in enumerate(case.plan.slots):
        new = tuple(map(tuple, result.slots[layer].tolist()))
        assert result.moved[layer] == moved_experts(old, new)
        peak_before = max(rank_loads(old, case.loads[layer]))
        carries_no_more = max(rank_loads(new, case.loads[layer])) <= peak_before * (1 + RELATIVE)
        assert bool(result.fits[layer]) == carries_no_more
        if not result.fits[layer]:
            assert np.array_equal(result.slots[layer], kept[layer])  # for the planner to refuse


def test_growing_replicates_a_hot_expert_by_local_copies_moving_nothing() -> None:
    layer = ((0, 1), (0, 1), (1, 0), (1, 1))  # expert 1: 2/5 of its load on rank 3
    result = replace_slots([layer], [(1.0, 6.0)], slots_per_rank=3)
    assert result.fits[0] and result.after[0] < result.before[0]
    assert result.moved[0] == 0  # every rank holds expert 1: more copies of it move nothing
