"""plan_rebalance: method selection, versions, round-robin, input errors."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moe_contract.plan import Plan, round_robin_plan, validate_plan
from moe_operator.planning.placement import rank_loads
from moe_operator.planning.planners import (
    AUTO,
    GATING_BIAS,
    REPLACE,
    ROUND_ROBIN,
    PlanningError,
    choose_method,
    plan_rebalance,
)

from .strategies import Case, cases

SKEWED = [[50.0, 10.0, 10.0, 10.0], [10.0, 10.0, 10.0, 50.0]]


@pytest.mark.parametrize(
    ("experts", "ranks", "slots", "method"),
    [
        (16, 16, 1, GATING_BIAS),  # the seed's layout: nothing to replicate
        (4, 4, 1, GATING_BIAS),
        (16, 16, 2, REPLACE),  # spare slots
        (8, 16, 1, REPLACE),  # fewer experts than ranks: spare slots
        (32, 16, 2, REPLACE),  # no spare slot, but re-packing two per rank helps
    ],
)
def test_auto_picks_gating_bias_only_when_nothing_can_be_replicated(
    experts: int, ranks: int, slots: int, method: str
) -> None:
    assert choose_method(experts, ranks, slots) == method


def test_auto_resolves_and_reports_the_method_it_ran() -> None:
    seed = plan_rebalance(SKEWED, world_size=4, slots_per_rank=1, method=AUTO)
    assert seed.method == seed.plan.method == GATING_BIAS
    spare = plan_rebalance(SKEWED, world_size=4, slots_per_rank=2, method=AUTO)
    assert spare.method == spare.plan.method == REPLACE
    assert spare.changed and spare.slots_moved > 0
    assert spare.imbalance_after < spare.imbalance_before
    assert spare.summary().startswith(
        f"imbalance {spare.imbalance_before:.2f} -> {spare.imbalance_after:.2f}, "
        f"{spare.slots_moved} slots moved (Replace)"
    )


def test_replace_on_the_seed_layout_says_it_cannot_help() -> None:
    result = plan_rebalance(SKEWED, world_size=4, slots_per_rank=1, method=REPLACE)
    assert not result.changed
    assert result.slots_moved == 0
    assert result.plan == round_robin_plan(2, 4, 4, 1)
    assert "nothing to replicate" in result.note
    assert result.imbalance_after == result.imbalance_before == 2.5


def test_versions_increase_by_one_from_the_previous_plan() -> None:
    previous = round_robin_plan(2, 4, 4, 2, version=7)
    result = plan_rebalance(SKEWED, world_size=4, slots_per_rank=2, previous=previous)
    assert result.changed and result.plan.version == 8
    again = plan_rebalance(SKEWED, world_size=4, slots_per_rank=2, previous=result.plan)
    assert not again.changed and again.plan is result.plan  # nothing left worth moving
    assert again.slots_moved == 0


def test_replace_removes_a_gate_bias_so_outputs_are_the_models_own() -> None:
    # Nobody would update a bias left behind once Replace runs, so Replace takes it out.
    biased = plan_rebalance(SKEWED, world_size=8, slots_per_rank=1, method=GATING_BIAS).plan
    assert biased.gate_bias is not None
    result = plan_rebalance(SKEWED, world_size=8, slots_per_rank=1, previous=biased)
    assert result.method == REPLACE and result.changed
    assert result.plan.gate_bias is None and result.plan.gate_max_margin is None
    assert "gate bias removed" in result.note


def test_auto_grows_the_seed_layout_into_spare_memory_and_uses_replace() -> None:
    result = plan_rebalance(SKEWED, world_size=4, slots_per_rank=1, max_slots_per_rank=2)
    assert result.method == result.plan.method == REPLACE
    assert result.plan.slots_per_rank == 2 and result.plan.gate_bias is None
    validate_plan(result.plan, num_layers=2, num_experts=4, world_size=4, max_slots_per_rank=2)
    assert result.imbalance_after < result.imbalance_before == 2.5
    assert result.slots_moved > 0
    assert "grown 1 -> 2" in result.note
    # the grown plan is the next previous: slots stay grown, nothing more to gain
    again = plan_rebalance(
        SKEWED, world_size=4, slots_per_rank=1, max_slots_per_rank=2, previous=result.plan
    )
    assert again.plan.slots_per_rank == 2 and again.method == REPLACE


def test_without_a_slot_to_add_auto_is_gating_bias() -> None:
    assert choose_method(4, 4, 1, max_slots_per_rank=1) == GATING_BIAS
    assert choose_method(4, 4, 1, max_slots_per_rank=2) == REPLACE
    assert choose_method(4, 4, 2, max_slots_per_rank=2) == REPLACE
    result = plan_rebalance(SKEWED, world_size=4, slots_per_rank=1, max_slots_per_rank=1)
    assert result.method == GATING_BIAS


def test_growth_is_refused_when_it_does_not_pay_for_its_moves() -> None:
    balanced = [[10.0, 10.0, 10.0, 10.0]] * 2
    result = plan_rebalance(balanced, world_size=4, slots_per_rank=1, max_slots_per_rank=3)
    assert not result.changed and result.plan.slots_per_rank == 1
    assert result.method == REPLACE


def test_explicit_gating_bias_never_grows() -> None:
    result = plan_rebalance(
        SKEWED, world_size=4, slots_per_rank=1, max_slots_per_rank=2, method=GATING_BIAS
    )
    assert result.plan.slots_per_rank == 1 and result.plan.gate_bias is not None


# Layer 1 has both experts on every rank; growing it by copying each rank's first expert made
# rank 0 hold two of seven replicas of expert 1 (2/7 of its tokens, was 1/4) while layer 2 paid.
GROWN_SHARED = Case(
    layers=3,
    experts=2,
    ranks=4,
    slots_per_rank=2,
    plan=Plan(
        version=1,
        slotsPerRank=2,
        slots=(
            ((1, 0), (1, 0), (0, 1), (1, 0)),
            ((1, 0), (0, 1), (1, 0), (1, 0)),
            ((0, 1), (0, 1), (1, 0), (1, 1)),
        ),
    ),
    loads=((0.0, 0.0), (0.0, 1.0), (1.0, 6.0)),
)


@settings(max_examples=40, deadline=None)
@given(cases(max_ranks=5, max_slots=2), st.integers(0, 2))
@example(GROWN_SHARED, 1)
def test_growing_never_loses_an_expert_nor_raises_the_max_rank_load(case: Case, extra: int) -> None:
    most = case.slots_per_rank + extra
    result = plan_rebalance(
        case.loads,
        world_size=case.ranks,
        slots_per_rank=case.slots_per_rank,
        previous=case.plan,
        max_slots_per_rank=most,
    )
    plan = result.plan
    validate_plan(
        plan,
        num_layers=case.layers,
        num_experts=case.experts,
        world_size=case.ranks,
        max_slots_per_rank=most,
    )
    assert case.slots_per_rank <= plan.slots_per_rank <= most
    for layer_before, layer_after, loads in zip(
        case.plan.slots, plan.slots, case.loads, strict=True
    ):
        peak_before = max(rank_loads(layer_before, loads))
        assert max(rank_loads(layer_after, loads)) <= peak_before * (1 + 1e-9)
    if result.method == REPLACE:
        assert plan.gate_bias is None  # output-preserving: routing is the model's own


def test_round_robin_resets_to_the_seed_placement_without_bias() -> None:
    moved = plan_rebalance(SKEWED, world_size=4, slots_per_rank=2, method=REPLACE).plan
    result = plan_rebalance(
        SKEWED, world_size=4, slots_per_rank=2, previous=moved, method=ROUND_ROBIN
    )
    assert result.plan.slots == round_robin_plan(2, 4, 4, 2).slots
    assert result.plan.version == moved.version + 1
    assert result.plan.gate_bias is None
    assert result.slots_moved > 0
    assert result.imbalance_after == max(result.per_layer_after)
    unchanged = plan_rebalance(SKEWED, world_size=4, slots_per_rank=2, method=ROUND_ROBIN)
    assert not unchanged.changed and "plan unchanged" in unchanged.note


@settings(max_examples=40, deadline=None)
@given(cases())
def test_result_fields_agree_with_each_other(case: Case) -> None:
    result = plan_rebalance(
        case.loads,
        world_size=case.ranks,
        slots_per_rank=case.slots_per_rank,
        previous=case.plan,
    )
    assert result.imbalance_before == max(result.per_layer_before)
    assert result.imbalance_after == max(result.per_layer_after)
    assert len(result.per_layer_before) == len(result.per_layer_after) == case.layers
    assert result.changed == (result.plan != case.plan)
    assert result.plan.version == case.plan.version + (1 if result.changed else 0)
    assert "\n" not in result.summary()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 2, "slots_per_rank": 1}, "slotsPerRank: 2 ranks x 1 slots cannot hold 4"),
        ({"world_size": 0, "slots_per_rank": 1}, "ranks: must be >= 1"),
        ({"world_size": 4, "slots_per_rank": 0}, "slotsPerRank: must be >= 1"),
        ({"world_size": 4, "slots_per_rank": 1, "method": "Magic"}, "method: 'Magic'"),
        (
            {"world_size": 4, "slots_per_rank": 2, "previous": round_robin_plan(2, 4, 4, 1)},
            "previous plan: slotsPerRank: the previous plan has 1, asked for 2",
        ),
        (
            {"world_size": 4, "slots_per_rank": 1, "previous": round_robin_plan(2, 4, 4, 3)},
            "previous plan: slotsPerRank: 3 exceeds the 1 slots per rank",
        ),
        (
            {"world_size": 4, "slots_per_rank": 2, "max_slots_per_rank": 1},
            "maxSlotsPerRank: 1 is below slotsPerRank 2",
        ),
        (
            {"world_size": 4, "slots_per_rank": 1, "previous": round_robin_plan(3, 4, 4, 1)},
            "previous plan: slots: has 3 layers, the model has 2",
        ),
        (
            {"world_size": 2, "slots_per_rank": 2, "previous": round_robin_plan(2, 4, 4, 2)},
            "previous plan: slots[0]: has 4 ranks, the world size is 2",
        ),
    ],
)
def test_inputs_that_do_not_fit_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanningError) as error:
        plan_rebalance(SKEWED, **kwargs)
    assert message in str(error.value)


def test_bad_loads_raise_a_planning_error() -> None:
    with pytest.raises(PlanningError, match=r"expert_load\[1\]"):
        plan_rebalance([[1.0, 2.0], [1.0]], world_size=2, slots_per_rank=1)


def test_auto_keeps_every_expert_on_two_pods_where_the_slots_allow_and_balance_wins_else() -> None:
    """Issue 22, item 3: 8 experts on 4 ranks of 4 slots in pods of 2 (room for two replicas
    each). Replace alone leaves six experts of layer 0 within one pod; Auto balances as well
    with every expert in both pods, so losing either pod loses no expert. A skew that needs the
    slots keeps its balance (the hot expert keeps its replicas)."""
    from moe_contract.elastic import redundancy

    loads = [[19.0, 14.0, 5.0, 18.0, 8.0, 10.0, 14.0, 8.0],
             [15.0, 18.0, 11.0, 14.0, 14.0, 20.0, 17.0, 6.0]]  # fmt: skip
    replace = plan_rebalance(loads, world_size=4, slots_per_rank=4, method=REPLACE, ranks_per_pod=2)
    assert not redundancy(replace.plan).survives_domain_loss
    auto = plan_rebalance(loads, world_size=4, slots_per_rank=4, method=AUTO, ranks_per_pod=2)
    assert auto.changed and auto.method == REPLACE
    assert redundancy(auto.plan).survives_domain_loss
    assert auto.imbalance_after <= replace.imbalance_after * 1.05
    steep = [[400.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]] * 2
    hot = plan_rebalance(steep, world_size=8, slots_per_rank=3, method=AUTO, ranks_per_pod=2)
    same = plan_rebalance(steep, world_size=8, slots_per_rank=3, method=REPLACE, ranks_per_pod=2)
    assert hot.imbalance_after == same.imbalance_after
