"""GatingBias: the damped update, its bounds, the price cap, and what the plan and summary say."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_operator.planning.gating import (
    CAP_AIM,
    FIRST_BIAS_PER_CAP,
    GROWTH_PER_EVALUATION,
    GatingOptions,
    allowed_magnitude,
    layer_step,
    update_bias,
    update_layer_bias,
)
from moe_operator.planning.planners import GATING_BIAS, NEGLIGIBLE_BIAS, plan_rebalance

NO_LIMITS = {"max_bias": 1.0, "damping": 0.0, "max_rerouted_fraction": None}


def test_the_step_is_proportional_to_the_relative_error_and_vanishes_at_the_mean() -> None:
    # mean 20, E = 4, rate 0.4: one unit of relative error moves 0.1 (x the relative load)
    step = layer_step([40.0, 0.0, 20.0, 20.0], rate=0.4)
    assert step == pytest.approx((-0.1 * 2, 0.1 * 0.5, 0.0, 0.0))  # rel 2, 0 (floor 1/2), 1, 1
    # far from the mean the error is clipped to -1: a very hot expert moves by its relative load
    assert layer_step([70.0, 10.0, 0.0, 0.0], rate=0.4)[0] == pytest.approx(-0.1 * 3.5)


def test_hot_experts_go_down_cold_ones_up_and_the_bias_stays_centred() -> None:
    options = GatingOptions(rate=0.4, **NO_LIMITS)
    bias = update_layer_bias([0.1, 0.0, -0.1, 0.0], [40.0, 0.0, 20.0, 20.0], options)
    assert bias[0] < 0.1 and bias[1] > 0.0
    assert sum(bias) == pytest.approx(0.0, abs=1e-12)  # only differences select


def test_the_first_bias_from_zero_is_half_a_unit_step_and_a_fifth_of_the_cap() -> None:
    loads = [100.0, 0.0, 0.0, 0.0]
    uncapped = GatingOptions(rate=0.4, max_bias=1.0, max_rerouted_fraction=None)
    bias = update_layer_bias([0.0] * 4, loads, uncapped)
    assert max(abs(b) for b in bias) == pytest.approx(0.4 / 4 / 2)
    capped = GatingOptions(rate=0.4, max_bias=1.0, max_rerouted_fraction=0.1)
    bias = update_layer_bias([0.0] * 4, loads, capped)
    assert max(abs(b) for b in bias) == pytest.approx(FIRST_BIAS_PER_CAP * 0.1)


def test_a_bias_grows_at_most_twice_per_evaluation() -> None:
    options = GatingOptions(rate=10.0, max_bias=1.0, damping=0.0)
    bias = update_layer_bias([-0.01, 0.01], [100.0, 0.0], options)
    assert max(abs(b) for b in bias) == pytest.approx(0.01 * GROWTH_PER_EVALUATION)


def test_balanced_load_decays_the_bias_geometrically() -> None:
    options = GatingOptions(damping=0.25)
    bias = (-0.08, 0.08, 0.0)
    for _ in range(3):
        bias = update_layer_bias(bias, [10.0, 10.0, 10.0], options)
    assert bias == pytest.approx((-0.08 * 0.75**3, 0.08 * 0.75**3, 0.0))


def test_a_layer_without_traffic_keeps_its_bias() -> None:
    assert update_layer_bias([0.2, -0.2], [0.0, 0.0], GatingOptions()) == (0.2, -0.2)


def test_a_measured_price_above_the_cap_shrinks_the_bias_below_it() -> None:
    options = GatingOptions(max_bias=1.0, max_rerouted_fraction=0.1)
    bias = [-0.2, 0.2, 0.0, 0.0]
    loads = [30.0, 10.0, 10.0, 10.0]  # still unbalanced: the step alone would grow the bias
    capped = update_layer_bias(bias, loads, options, rerouted_fraction=0.3)
    assert max(abs(b) for b in capped) == pytest.approx(0.2 * CAP_AIM * 0.1 / 0.3)
    free = update_layer_bias(bias, loads, options, rerouted_fraction=None)
    assert max(abs(b) for b in free) > 0.2


def test_a_cheap_bias_may_grow_only_up_to_the_cap() -> None:
    options = GatingOptions(max_bias=1.0, max_rerouted_fraction=0.1)
    assert allowed_magnitude([-0.1, 0.1], 0.06, options) == pytest.approx(0.1 * CAP_AIM / 0.6)
    assert allowed_magnitude([-0.1, 0.1], 0.01, options) == pytest.approx(0.2)  # growth limit
    no_cap = GatingOptions(max_rerouted_fraction=None)
    assert allowed_magnitude([-0.1, 0.1], 0.9, no_cap) == pytest.approx(0.2)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda e: st.tuples(
            st.lists(st.floats(-1, 1), min_size=e, max_size=e),
            st.lists(st.integers(0, 10_000), min_size=e, max_size=e),
            st.floats(0, 5),
            st.floats(0, 1),
            st.floats(0, 0.99),
            st.one_of(st.none(), st.floats(0, 1)),
            st.one_of(st.none(), st.floats(0, 1)),
        )
    )
)
def test_the_update_never_leaves_its_bounds(args) -> None:
    bias, load, rate, max_bias, damping, cap, measured = args
    options = GatingOptions(
        rate=rate, max_bias=max_bias, damping=damping, max_rerouted_fraction=cap
    )
    new = update_layer_bias(bias, [float(x) for x in load], options, measured)
    assert len(new) == len(bias)
    if sum(load) == 0:
        assert new == tuple(bias)
        return
    assert all(-max_bias - 1e-12 <= b <= max_bias + 1e-12 for b in new)
    assert max(abs(b) for b in new) <= allowed_magnitude(bias, measured, options) * (1 + 1e-9)


def test_update_bias_checks_the_measured_fractions_shape() -> None:
    with pytest.raises(ValueError, match="rerouted_fraction: has 1 layers"):
        update_bias(None, [[1.0, 2.0], [2.0, 1.0]], GatingOptions(), [0.1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": -0.1}, "rate"),
        ({"max_bias": float("nan")}, "max_bias"),
        ({"max_bias": 1.5}, "max_bias"),
        ({"damping": 1.0}, "damping"),
        ({"max_margin": -0.01}, "max_margin"),
        ({"max_rerouted_fraction": 2.0}, "max_rerouted_fraction"),
    ],
)
def test_options_refuse_values_out_of_range(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        GatingOptions(**kwargs)


def test_gating_bias_plan_keeps_slots_carries_bias_and_margin_and_says_it_changes_routing() -> None:
    loads = [[40.0, 10.0, 10.0, 20.0], [10.0, 10.0, 10.0, 10.0]]
    options = GatingOptions(max_margin=0.04)
    first = plan_rebalance(
        loads, world_size=4, slots_per_rank=1, method=GATING_BIAS, gating_options=options
    )
    assert first.changed
    assert first.plan.version == 2  # the round-robin start is version 1
    assert first.plan.method == GATING_BIAS
    assert first.plan.gate_max_margin == 0.04
    assert first.plan.gate_bias is not None
    hot, *rest = first.plan.gate_bias[0]
    assert hot < 0 < max(rest)
    assert first.plan.gate_bias[1] == (0.0, 0.0, 0.0, 0.0)  # a balanced layer gets none
    assert first.plan.slots == tuple(tuple((e,) for e in range(4)) for _ in range(2))
    assert first.slots_moved == 0
    assert "not output-preserving" in first.note and "within 0.04" in first.note
    assert "not predicted" in first.note and "not predicted" in first.summary()
    assert first.imbalance_after == first.imbalance_before == 2.0  # current, not a guess

    second = plan_rebalance(
        loads,
        world_size=4,
        slots_per_rank=1,
        previous=first.plan,
        method=GATING_BIAS,
        gating_options=options,
    )
    assert second.plan.version == 3
    assert second.plan.gate_bias is not None
    assert second.plan.gate_bias[0][0] < hot  # the same load pushes further


def test_gating_bias_on_balanced_loads_changes_nothing() -> None:
    result = plan_rebalance([[5.0, 5.0]], world_size=2, slots_per_rank=1, method=GATING_BIAS)
    assert not result.changed
    assert result.plan.version == 1
    assert result.plan.gate_bias is None
    assert "plan unchanged" in result.note


def test_a_decaying_bias_goes_all_the_way_and_is_removed_then_nothing_follows() -> None:
    options = GatingOptions(damping=0.3)
    plan = plan_rebalance(
        [[30.0, 10.0]], world_size=2, slots_per_rank=1, method=GATING_BIAS, gating_options=options
    ).plan
    assert plan.gate_bias is not None
    notes = []
    for _ in range(60):  # the skew is gone: the leak shrinks the bias every evaluation
        result = plan_rebalance(
            [[20.0, 20.0]],
            world_size=2,
            slots_per_rank=1,
            previous=plan,
            method=GATING_BIAS,
            gating_options=options,
        )
        if result.changed:
            notes.append(result.note)
        plan = result.plan
    assert plan.gate_bias is None and plan.gate_max_margin is None
    assert "removed" in notes[-1]
    assert len(notes) < 60  # once removed, no further plan


def test_a_move_below_the_negligible_bias_is_no_new_plan() -> None:
    options = GatingOptions(damping=0.0)
    first = plan_rebalance(
        [[30.0, 10.0]], world_size=2, slots_per_rank=1, method=GATING_BIAS, gating_options=options
    ).plan
    assert first.gate_bias is not None
    nearly = [[20.0 + 1e-3, 20.0 - 1e-3]]  # a step of ~1e-8: noise, not worth a switch
    result = plan_rebalance(
        nearly,
        world_size=2,
        slots_per_rank=1,
        previous=first,
        method=GATING_BIAS,
        gating_options=options,
    )
    assert not result.changed and result.plan is first
    assert f"{NEGLIGIBLE_BIAS:g}" in result.note


def test_the_cap_shrinks_only_the_layers_above_it_and_the_note_names_them() -> None:
    options = GatingOptions(max_rerouted_fraction=0.1)
    loads = [[30.0, 10.0], [30.0, 10.0]]
    first = plan_rebalance(
        loads, world_size=2, slots_per_rank=1, method=GATING_BIAS, gating_options=options
    ).plan
    second = plan_rebalance(
        loads,
        world_size=2,
        slots_per_rank=1,
        previous=first,
        method=GATING_BIAS,
        gating_options=options,
        rerouted_fraction=[0.5, 0.01],
    )
    assert first.gate_bias is not None and second.plan.gate_bias is not None
    over, under = (max(abs(b) for b in row) for row in second.plan.gate_bias)
    assert over < max(abs(b) for b in first.gate_bias[0]) < under
    assert "bias shrunk on 1 layers" in second.note and "[0]" in second.note
