"""The load model: rank loads, imbalance, moved experts, load validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_contract.plan import Plan, moved_experts, plan_transfers
from moe_operator.planning.placement import (
    LoadError,
    check_loads,
    imbalance,
    layer_imbalances,
    rank_loads,
    replica_counts,
)

from .strategies import Case, cases
from .strategies import layer_slots as draw_layer_slots


def test_replicated_expert_splits_its_tokens_evenly() -> None:
    layer = ((0, 1), (0, 2), (3, 0))  # expert 0 on three ranks
    assert replica_counts(layer, 4) == (3, 1, 1, 1)
    assert rank_loads(layer, [90.0, 10.0, 20.0, 40.0]) == (40.0, 50.0, 70.0)


def test_imbalance_is_max_over_mean() -> None:
    assert imbalance([10.0, 10.0, 10.0, 10.0]) == 1.0
    assert imbalance([40.0, 0.0, 0.0, 0.0]) == 4.0
    assert imbalance([3.0, 1.0]) == 1.5


def test_a_layer_without_tokens_counts_as_balanced() -> None:
    assert imbalance([0.0, 0.0, 0.0]) == 1.0
    assert layer_imbalances([((0,), (1,))], [[0.0, 0.0]]) == (1.0,)


def test_seed_layout_imbalance_equals_expert_load_ratio() -> None:
    slots = [tuple((e,) for e in range(4))]
    assert layer_imbalances(slots, [[5.0, 1.0, 1.0, 1.0]]) == (2.5,)


def test_moved_experts_counts_experts_new_to_a_rank_regardless_of_slot_index() -> None:
    before = ((0, 1), (2, 3))
    assert moved_experts(before, ((1, 0), (2, 3))) == 0  # swapped inside a rank: no copy
    assert moved_experts(before, ((0, 2), (2, 3))) == 1
    assert moved_experts(before, ((2, 3), (0, 1))) == 4
    assert moved_experts(((0, 0),), ((0, 1),)) == 1
    # a second copy of an expert the rank already holds is a local copy, not a transfer
    assert moved_experts(before, ((0, 0), (2, 1))) == 1


@given(cases(), st.data())
def test_moved_experts_is_what_the_workers_transfer(case: Case, data: st.DataObject) -> None:
    """The operator's count (slotsMoved) and the worker's transfers are one definition."""
    old = case.plan
    new_slots = tuple(
        data.draw(draw_layer_slots(case.experts, case.ranks, case.slots_per_rank))
        for _ in range(case.layers)
    )
    new = Plan(version=old.version + 1, slotsPerRank=case.slots_per_rank, slots=new_slots)
    counted = sum(moved_experts(o, n) for o, n in zip(old.slots, new.slots, strict=True))
    transfers = plan_transfers(old, new)
    assert counted == len(transfers)
    for t in transfers:  # every transfer brings an expert its destination lacked, from a holder
        assert t.expert in new.slots[t.layer][t.dst] and t.expert not in old.slots[t.layer][t.dst]
        assert t.expert in old.slots[t.layer][t.src]


@given(cases())
def test_rank_loads_conserve_tokens(case: Case) -> None:
    for layer_slots, layer_load in zip(case.plan.slots, case.loads, strict=True):
        assert math.isclose(sum(rank_loads(layer_slots, layer_load)), sum(layer_load), rel_tol=1e-9)
        assert imbalance(rank_loads(layer_slots, layer_load)) >= 1.0 - 1e-12


@given(st.lists(st.lists(st.integers(0, 100), min_size=3, max_size=3), min_size=1, max_size=4))
def test_check_loads_accepts_rectangular_non_negative_numbers(rows: list[list[int]]) -> None:
    assert check_loads(rows) == tuple(tuple(float(v) for v in row) for row in rows)


@pytest.mark.parametrize(
    ("loads", "field"),
    [
        ([], "expert_load:"),
        ({"a": 1}, "expert_load:"),
        ([[1, 2], [1]], "expert_load[1]: has 1 experts, expected 2"),
        ([[1, "x"]], "expert_load[0][1]: must be a number"),
        ([[1, True]], "expert_load[0][1]: must be a number"),
        ([[1, -1]], "expert_load[0][1]: must be finite and >= 0"),
        ([[1, float("nan")]], "expert_load[0][1]: must be finite and >= 0"),
        ([[1, float("inf")]], "expert_load[0][1]: must be finite and >= 0"),
        ([5], "expert_load[0]: must be a list"),
        ([[]], "expert_load[0]: has no experts"),
    ],
)
def test_check_loads_names_the_bad_field(loads: object, field: str) -> None:
    with pytest.raises(LoadError) as error:
        check_loads(loads)
    assert field in str(error.value)


def test_check_loads_with_known_expert_count() -> None:
    with pytest.raises(LoadError, match=r"expert_load\[0\]: has 2 experts, expected 3"):
        check_loads([[1, 2]], num_experts=3)
