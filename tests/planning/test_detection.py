"""Detection over load histories, and load windows from counter snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_operator.planning.detection import (
    Action,
    DetectionPolicy,
    DetectionState,
    Observation,
    counter_deltas,
    evaluate,
    plan_issued,
)
from moe_operator.planning.ledger import Ledger

POLICY = DetectionPolicy(threshold=1.5, consecutive=3, cooldown_seconds=600)
HIGH, LOW = Observation((1.1, 2.0)), Observation((1.1, 1.2))
SKIPPED = Observation(skip_reason="pod w-3 missing")


def run(
    history: list[Observation],
    state: DetectionState | None = None,
    start: float = 0.0,
    step: float = 60.0,
) -> tuple[DetectionState, list[Action]]:
    state = state or DetectionState()
    actions = []
    for index, observation in enumerate(history):
        state, decision = evaluate(state, observation, start + index * step, POLICY)
        actions.append(decision.action)
    return state, actions


def test_acts_after_the_configured_number_of_consecutive_evaluations() -> None:
    state, actions = run([HIGH, HIGH, HIGH])
    assert actions == [Action.HOLD, Action.HOLD, Action.REBALANCE]
    assert state.above_count == 0  # acting restarts the streak


def test_a_balanced_evaluation_breaks_the_streak() -> None:
    _, actions = run([HIGH, HIGH, LOW, HIGH, HIGH])
    assert Action.REBALANCE not in actions
    _, actions = run([HIGH, HIGH, LOW, HIGH, HIGH, HIGH])
    assert actions[-1] == Action.REBALANCE


def test_threshold_is_strict_and_reports_the_worst_layer() -> None:
    at = Observation((1.5, 1.0))
    _, actions = run([at, at, at, at])
    assert set(actions) == {Action.HOLD}
    _, decision = evaluate(DetectionState(), Observation((1.0, 3.0, 2.0)), 0.0, POLICY)
    assert (decision.worst_layer, decision.worst_imbalance) == (1, 3.0)
    assert "layer 1 at 3.00 > 1.50 (1 of 3" in decision.reason


def test_a_skipped_evaluation_is_never_acted_on_and_restarts_the_streak() -> None:
    _, actions = run([HIGH, HIGH, SKIPPED, HIGH, HIGH])
    assert actions[2] == Action.SKIP
    assert Action.REBALANCE not in actions
    _, decision = evaluate(DetectionState(above_count=2), SKIPPED, 0.0, POLICY)
    assert decision.action == Action.SKIP and "pod w-3 missing" in decision.reason
    _, decision = evaluate(DetectionState(above_count=2), Observation(()), 0.0, POLICY)
    assert decision.action == Action.SKIP


def test_no_new_plan_while_one_is_in_flight() -> None:
    state, _ = run([HIGH, HIGH, HIGH])
    state = plan_issued(state, now=180.0)
    in_flight = Ledger(desired=2, applied=1)
    later = 10_000.0  # far past the cooldown
    for index in range(5):  # workers keep serving version 1
        state, decision = evaluate(
            state, Observation((3.0,), ledger=in_flight), later + index, POLICY
        )
        assert decision.action == Action.HOLD
        assert "plan version 2 in flight (workers serve version 1)" in decision.reason
    assert state.above_count == 0
    applied = Observation((3.0,), ledger=in_flight.serving(2))
    state, actions = run([applied, HIGH, HIGH], state, later + 10)
    assert actions == [Action.HOLD, Action.HOLD, Action.REBALANCE]


def test_cooldown_after_the_last_rebalance() -> None:
    state, _ = run([HIGH, HIGH, HIGH])
    state = plan_issued(state, now=120.0)
    applied = Observation((1.1, 2.0), ledger=Ledger(desired=2, applied=2))
    # evaluations at 180, 240, ... : the streak completes at 300 but the cooldown ends at 720
    state, actions = run([applied] * 8, state, start=180.0)
    assert actions == [Action.HOLD] * 8
    _, decision = evaluate(state, applied, 700.0, POLICY)
    assert decision.action == Action.HOLD and "cooldown for 20s more" in decision.reason
    _, decision = evaluate(state, applied, 720.0, POLICY)
    assert decision.action == Action.REBALANCE


def test_state_reads_back_from_status_and_a_fresh_status() -> None:
    state, _ = run([HIGH, HIGH])
    assert DetectionState.from_dict({"aboveCount": 2, "lastRebalanceAt": None}) == state
    issued = plan_issued(state, now=12.5)
    assert issued == DetectionState(above_count=0, last_rebalance_at=12.5)
    assert DetectionState.from_dict({"aboveCount": 0, "lastRebalanceAt": 12.5}) == issued
    assert DetectionState.from_dict(None) == DetectionState()
    assert DetectionState.from_dict({}) == DetectionState()
    # an older operator's status also held versions there: they are the ledger's now
    legacy = {"aboveCount": 1, "desiredVersion": 5, "appliedVersion": 5, "lastRebalanceAt": 3.0}
    assert DetectionState.from_dict(legacy) == DetectionState(1, 3.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.9}, "threshold"),
        ({"consecutive": 0}, "consecutive"),
        ({"cooldown_seconds": -1.0}, "cooldown_seconds"),
    ],
)
def test_policy_refuses_nonsense(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DetectionPolicy(**kwargs)


step = st.one_of(
    st.floats(1.0, 3.0).map(lambda worst: ("load", worst)),
    st.just(("skip", 0.0)),
    st.just(("apply", 0.0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=40), st.integers(1, 4), st.sampled_from([0.0, 100.0, 250.0]))
def test_rebalance_only_after_enough_usable_evidence_outside_cooldown_and_flight(
    history: list[tuple[str, float]], consecutive: int, cooldown: float
) -> None:
    """Model of the operator: every Rebalance issues a plan; 'apply' is the workers catching up."""
    policy = DetectionPolicy(threshold=1.5, consecutive=consecutive, cooldown_seconds=cooldown)
    state, ledger, recent = DetectionState(), Ledger(), []
    issued_at: float | None = None
    for index, (kind, worst) in enumerate(history):
        now = index * 60.0
        if kind == "apply":
            ledger = ledger.serving(ledger.desired)
            observation = Observation((1.0,), ledger=ledger)
        elif kind == "skip":
            observation = Observation(skip_reason="counter reset", ledger=ledger)
        else:
            observation = Observation((1.0, worst), ledger=ledger)
        in_flight_before = ledger.in_flight
        state, decision = evaluate(state, observation, now, policy)
        recent.append(None if kind == "skip" or in_flight_before else worst)
        if decision.action == Action.REBALANCE:
            window = recent[-consecutive:]
            assert len(window) == consecutive
            assert all(value is not None and value > 1.5 for value in window)
            assert not in_flight_before
            assert issued_at is None or now - issued_at >= cooldown
            ledger = Ledger(ledger.next_version(), ledger.applied)
            state = plan_issued(state, now)
            issued_at, recent = now, []
        if kind == "skip":
            assert decision.action == Action.SKIP or in_flight_before


def test_counter_deltas_sum_over_sources() -> None:
    previous = {"w-0": {(0, 0): 10.0, (0, 1): 5.0}, "w-1": {(0, 1): 1.0, (1, 2): 0.0}}
    current = {"w-0": {(0, 0): 30.0, (0, 1): 6.0}, "w-1": {(0, 1): 4.0, (1, 2): 7.0}}
    window = counter_deltas(
        previous, current, num_layers=2, num_experts=3, expected_sources=["w-0", "w-1"]
    )
    assert window.usable and window.skip_reason is None
    assert window.expert_load == ((20.0, 4.0, 0.0), (0.0, 0.0, 7.0))
    assert window.sources == ("w-0", "w-1")


GOOD_PREVIOUS = {"w-0": {(0, 0): 10.0}, "w-1": {(0, 1): 3.0}}
GOOD_CURRENT = {"w-0": {(0, 0): 12.0}, "w-1": {(0, 1): 5.0}}


@pytest.mark.parametrize(
    ("previous", "current", "expected", "reason"),
    [
        (
            GOOD_PREVIOUS,
            {"w-0": {(0, 0): 2.0}, "w-1": {(0, 1): 5.0}},
            None,
            "w-0: layer 0 expert 0: counter went down (10 -> 2): worker restarted?",
        ),
        (GOOD_PREVIOUS, {"w-0": {(0, 0): 12.0}}, None, "current snapshot lacks sources ['w-1']"),
        (
            GOOD_PREVIOUS,
            GOOD_CURRENT,
            ["w-0", "w-1", "w-2"],
            "previous snapshot lacks sources ['w-2']",
        ),
        (
            GOOD_PREVIOUS,
            {**GOOD_CURRENT, "w-9": {(0, 0): 1.0}},
            None,
            "sources differ between snapshots: ['w-9']",
        ),
        (
            GOOD_PREVIOUS,
            {"w-0": {(0, 0): 12.0, (0, 1): 1.0}, "w-1": {(0, 1): 5.0}},
            None,
            "w-0: counters differ between snapshots [(0, 1)]",
        ),
        ({"w-0": {(3, 0): 1.0}}, {"w-0": {(3, 0): 2.0}}, None, "layer 3 expert 0 is outside"),
        ({"w-0": {(0, 0): 1.0}}, {"w-0": {(0, 0): float("nan")}}, None, "not a finite count"),
        ({"w-0": {(0, 0): 1.0}}, {"w-0": {(0, 0): "7"}}, None, "is not a number"),
        ({}, {}, None, "no sources"),
    ],
)
def test_partial_or_reset_data_is_skipped_with_a_reason(
    previous: dict, current: dict, expected: list[str] | None, reason: str
) -> None:
    window = counter_deltas(
        previous, current, num_layers=2, num_experts=2, expected_sources=expected
    )
    assert not window.usable
    assert window.expert_load is None
    assert window.skip_reason is not None and reason in window.skip_reason


def test_counter_deltas_agree_with_good_data() -> None:
    window = counter_deltas(GOOD_PREVIOUS, GOOD_CURRENT, num_layers=1, num_experts=2)
    assert window.expert_load == ((2.0, 2.0),)
