"""GatingBias: the update's sign and clamp, and what the plan and summary say."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_operator.planning.gating import GatingOptions, update_bias, update_layer_bias
from moe_operator.planning.planners import GATING_BIAS, plan_rebalance


def test_overloaded_experts_go_down_underloaded_go_up_the_mean_stays() -> None:
    options = GatingOptions(rate=0.1, max_bias=1.0)
    # mean 20: expert 0 above, 1 below, 2 exactly at the mean
    assert update_layer_bias([0.0, 0.0, 0.0], [40.0, 0.0, 20.0], options) == (-0.1, 0.1, 0.0)


def test_bias_is_clamped_to_max_bias() -> None:
    options = GatingOptions(rate=0.3, max_bias=0.5)
    assert update_layer_bias([-0.4, 0.4], [10.0, 0.0], options) == (-0.5, 0.5)
    assert update_layer_bias([-0.5, 0.5], [10.0, 0.0], options) == (-0.5, 0.5)
    # a bias left beyond a lowered bound is brought back inside it
    assert update_layer_bias([0.9, -0.9], [5.0, 5.0], options) == (0.5, -0.5)


def test_a_layer_without_traffic_keeps_its_bias() -> None:
    assert update_layer_bias([0.2, -0.1], [0.0, 0.0], GatingOptions(max_bias=1.0)) == (0.2, -0.1)


@given(
    st.lists(st.floats(-1, 1), min_size=2, max_size=8).flatmap(
        lambda bias: st.tuples(
            st.just(bias),
            st.lists(st.integers(0, 1000), min_size=len(bias), max_size=len(bias)),
            st.floats(0, 0.5),
            st.floats(0, 0.5),
        )
    )
)
def test_update_moves_each_bias_by_at_most_rate_towards_the_mean_within_bounds(
    args: tuple[list[float], list[int], float, float],
) -> None:
    bias, load, rate, max_bias = args
    options = GatingOptions(rate=rate, max_bias=max_bias)
    new = update_layer_bias(bias, [float(x) for x in load], options)
    mean = sum(load) / len(load)
    for old, value, tokens in zip(bias, new, load, strict=True):
        assert -max_bias <= value <= max_bias
        clamped_old = min(max_bias, max(-max_bias, old))
        if tokens > mean:
            assert value <= clamped_old + 1e-12
        elif tokens < mean:
            assert value >= clamped_old - 1e-12
        if -max_bias < old < max_bias:
            assert abs(value - old) <= rate + 1e-12


def test_update_bias_starts_from_zero() -> None:
    assert update_bias(None, [[3.0, 1.0]], GatingOptions(rate=0.01, max_bias=0.1)) == (
        (-0.01, 0.01),
    )


@pytest.mark.parametrize(("rate", "max_bias"), [(-0.1, 1.0), (0.1, float("nan")), (0.1, -1.0)])
def test_options_refuse_negative_or_non_finite_values(rate: float, max_bias: float) -> None:
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        GatingOptions(rate=rate, max_bias=max_bias)


def test_gating_bias_plan_keeps_slots_carries_state_and_says_it_changes_routing() -> None:
    loads = [[40.0, 10.0, 10.0, 20.0], [10.0, 10.0, 10.0, 10.0]]
    first = plan_rebalance(loads, world_size=4, slots_per_rank=1, method=GATING_BIAS)
    assert first.changed
    assert first.plan.version == 2  # the round-robin start is version 1
    assert first.plan.method == GATING_BIAS
    # mean 20: expert 3 sits at the mean and keeps 0
    assert first.plan.gate_bias == ((-0.01, 0.01, 0.01, 0.0), (0.0, 0.0, 0.0, 0.0))
    assert first.plan.slots == tuple(tuple((e,) for e in range(4)) for _ in range(2))
    assert first.slots_moved == 0
    assert "not output-preserving" in first.note
    assert "not predicted" in first.note and "not predicted" in first.summary()
    assert first.imbalance_after == first.imbalance_before == 2.0  # current, not a guess

    second = plan_rebalance(
        loads, world_size=4, slots_per_rank=1, previous=first.plan, method=GATING_BIAS
    )
    assert second.plan.version == 3
    assert second.plan.gate_bias is not None
    assert second.plan.gate_bias[0] == (-0.02, 0.02, 0.02, 0.0)


def test_gating_bias_on_balanced_loads_changes_nothing() -> None:
    result = plan_rebalance([[5.0, 5.0]], world_size=2, slots_per_rank=1, method=GATING_BIAS)
    assert not result.changed
    assert result.plan.version == 1
    assert result.plan.gate_bias is None
    assert "plan unchanged" in result.note
