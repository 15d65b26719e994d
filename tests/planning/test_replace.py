"""Replace: invariants (property tests) and hand cases of the balance-versus-moves trade-off.

The hand cases run the operator's planner (`planning.replace`); the tests of the count and
alignment helpers run the reference implementation (`planning.reference`), whose numpy forms
test_replace_fast.py holds equal to it."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import Plan, moved_experts, validate_plan
from moe_operator.planning.placement import rank_loads
from moe_operator.planning.planners import REPLACE, plan_rebalance
from moe_operator.planning.reference import align, balanced_counts, count_path
from moe_operator.planning.replace import ReplaceOptions, replace_slots

from .strategies import Case, cases

RELATIVE = 1e-9


def replace_layer(
    current: tuple[tuple[int, ...], ...], load: list[float], options: ReplaceOptions
) -> tuple[tuple[int, ...], ...]:
    """One layer through the operator's planner."""
    return replace_slots([current], [load], options).as_tuples()[0]


def _replace(case: Case, gain: float = 0.005) -> Plan:
    return plan_rebalance(
        case.loads,
        world_size=case.ranks,
        slots_per_rank=case.slots_per_rank,
        previous=case.plan,
        method=REPLACE,
        replace_options=ReplaceOptions(min_gain_per_move=gain),
    ).plan


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from([0.0, 0.005, 0.1]))
def test_replace_keeps_the_plan_valid_and_never_raises_the_max_rank_load(
    case: Case, gain: float
) -> None:
    plan = _replace(case, gain)
    # every expert >= 1 replica, every rank exactly slotsPerRank slots, nothing out of range
    validate_plan(plan, num_layers=case.layers, num_experts=case.experts, world_size=case.ranks)
    assert plan.slots_per_rank == case.slots_per_rank
    for old, new, load in zip(case.plan.slots, plan.slots, case.loads, strict=True):
        assert all(len(rank) == case.slots_per_rank for rank in new)
        assert set(range(case.experts)) <= {e for rank in new for e in rank}
        before, after = max(rank_loads(old, load)), max(rank_loads(new, load))
        assert after <= before * (1 + RELATIVE)
        if moved_experts(old, new):
            assert after < before  # a move must buy something


@settings(max_examples=100, deadline=None)
@given(cases(), st.data())
def test_a_perfectly_balanced_plan_is_left_as_it_is(case: Case, data: st.DataObject) -> None:
    # loads proportional to replica counts: every slot carries the same tokens
    per_slot = data.draw(st.integers(1, 1000))
    loads = tuple(
        tuple(
            float(per_slot * Counter(e for r in layer for e in r)[x]) for x in range(case.experts)
        )
        for layer in case.plan.slots
    )
    result = plan_rebalance(
        loads,
        world_size=case.ranks,
        slots_per_rank=case.slots_per_rank,
        previous=case.plan,
        method=REPLACE,
        replace_options=ReplaceOptions(min_gain_per_move=0.0),
    )
    assert result.slots_moved == 0
    assert not result.changed
    assert result.plan == case.plan
    assert result.imbalance_before == result.imbalance_after == 1.0


@settings(max_examples=60, deadline=None)
@given(cases())
def test_same_input_same_plan(case: Case) -> None:
    assert _replace(case) == _replace(case)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_a_higher_price_per_move_never_moves_more(case: Case) -> None:
    for old, load in zip(case.plan.slots, case.loads, strict=True):
        moves = [
            moved_experts(old, replace_layer(old, load, ReplaceOptions(min_gain_per_move=gain)))
            for gain in (0.0, 0.001, 0.01, 0.1, 1.0)
        ]
        assert moves == sorted(moves, reverse=True)
        relative = [
            moved_experts(old, replace_layer(old, load, ReplaceOptions(min_gain_fraction=f)))
            for f in (0.0, 0.5, 1.0, 4.0, 64.0)
        ]
        assert relative == sorted(relative, reverse=True)


def test_a_hot_expert_gets_the_spare_slots() -> None:
    current = ((0, 1), (2, 3), (0, 1), (2, 3))  # round-robin-like, E=4 on R=4 x S=2
    load = [700.0, 100.0, 100.0, 100.0]
    new = replace_layer(current, load, ReplaceOptions(min_gain_fraction=0.0))
    counts = Counter(e for rank in new for e in rank)
    assert counts[0] >= 4
    assert max(rank_loads(new, load)) < max(rank_loads(current, load))
    # 8 slots, experts 1..3 need one each: 4 x 175 paired with 50, 50, 100, 100 is the optimum
    assert max(rank_loads(new, load)) == 275.0


def test_a_gain_below_the_price_of_its_moves_is_refused() -> None:
    current = ((0, 1), (2, 3))
    load = [60.0, 40.0, 50.0, 50.0]  # imbalance 1.0: nothing to gain
    assert replace_layer(current, load, ReplaceOptions(min_gain_fraction=0.0)) == current
    load = [70.0, 40.0, 30.0, 60.0]  # 110 vs 90: swapping 1 and 2 gives 100/100, 2 moves
    refused = ReplaceOptions(min_gain_per_move=0.2)  # gain 0.2 < 2 x 0.2
    assert replace_layer(current, load, refused) == current
    better = replace_layer(current, load, ReplaceOptions(min_gain_per_move=0.04))
    assert moved_experts(current, better) == 2
    assert rank_loads(better, load) == (100.0, 100.0)


def test_kept_experts_stay_in_their_slot_index() -> None:
    current = ((5, 0), (1, 2), (3, 4))
    aligned = align(((4, 1), (0, 2), (3, 5)), current)
    assert moved_experts(current, aligned) == 3  # the groups share one expert each with a rank
    for rank, slots in enumerate(aligned):
        for index, expert in enumerate(current[rank]):
            if expert in slots:
                assert slots[index] == expert


def test_balanced_counts_give_spare_slots_to_the_hottest_per_replica() -> None:
    assert balanced_counts([8.0, 4.0, 1.0], 6) == (3, 2, 1)
    assert balanced_counts([0.0, 0.0], 2) == (1, 1)


def test_count_path_walks_towards_balance_and_stops() -> None:
    path = count_path((1, 3), [90.0, 10.0])
    assert path[0] == (1, 3)
    assert path[-1] == (3, 1)
    assert all(sum(step) == 4 and min(step) >= 1 for step in path)
    assert count_path((1, 1), [5.0, 1.0]) == [(1, 1)]  # nothing to take from


def test_one_exchange_fixes_a_nearly_balanced_layer_with_two_moves() -> None:
    # balanced would be pairs {0,7} {1,6} {2,5} {3,4} (90 each); here 6 and 7 are swapped, and
    # the ranks are in another order than a fresh packing would number them
    load = [80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0]
    current = ((3, 4), (2, 5), (1, 7), (0, 6))
    new = replace_layer(current, load, ReplaceOptions(min_gain_per_move=0.001))
    assert rank_loads(new, load) == (90.0, 90.0, 90.0, 90.0)
    # the relative rule: 1.125 -> 1.0 closes the whole gap, two moves of 8 are worth it
    assert replace_layer(current, load, ReplaceOptions()) == new
    assert moved_experts(current, new) == 2
    assert new[:2] == current[:2]
