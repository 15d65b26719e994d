"""The plan-version ledger: read from status (old and new), never back, no version issued twice."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import MAX_PLAN_VERSION, Plan, PlanError, round_robin_plan
from moe_operator.planning.ledger import Ledger, NoVersionLeft

PLAN = round_robin_plan(2, 4, 2, 2)


def status_of(ledger: Ledger) -> dict[str, Any]:
    """What the operator writes back: one copy, in status.plan."""
    plan = {"version": ledger.desired, "appliedVersion": ledger.applied, "digest": ledger.digest}
    return {"plan": plan, "detection": {"aboveCount": 0, "lastRebalanceAt": None}}


def other_contents(plan: Plan) -> Plan:
    return Plan.model_validate({**plan.to_document(), "method": "Forged"})


def test_a_fresh_status_knows_no_version() -> None:
    assert Ledger.from_status(None) == Ledger.from_status({}) == Ledger(0, 0, "")
    assert not Ledger().in_flight and Ledger().next_version() == 1


def test_status_plan_is_read_with_its_digest() -> None:
    status = {"plan": {"version": 4, "appliedVersion": 3, "digest": "d4"}}
    assert Ledger.from_status(status) == Ledger(desired=4, applied=3, digest="d4")
    assert Ledger.from_status(status).in_flight


def test_an_older_operators_detection_versions_are_lower_bounds() -> None:
    """An operator upgrade keeps a running deployment's versions: the detection copies that
    older operators wrote count, and a digest only vouches for the version it came with."""
    ahead = {
        "plan": {"version": 4, "appliedVersion": 3, "digest": "d4"},
        "detection": {"aboveCount": 1, "desiredVersion": 5, "appliedVersion": 4},
    }
    assert Ledger.from_status(ahead) == Ledger(desired=5, applied=4, digest="")
    behind = {
        "plan": {"version": 4, "appliedVersion": 4, "digest": "d4"},
        "detection": {"desiredVersion": 2, "appliedVersion": 1},
    }
    assert Ledger.from_status(behind) == Ledger(desired=4, applied=4, digest="d4")
    only_detection = {"detection": {"desiredVersion": 7, "appliedVersion": 7}}
    assert Ledger.from_status(only_detection).next_version() == 8


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.text(max_size=8))
def test_status_round_trips(desired: int, applied: int, digest: str) -> None:
    ledger = Ledger(desired, applied, digest)
    assert Ledger.from_status(status_of(ledger)) == ledger


def test_the_record_is_vouched_for_only_when_not_older_nor_other_contents() -> None:
    ours = PLAN.with_version(4)
    ledger = Ledger(4, 4, ours.digest())
    assert ledger.vouches_for(ours) and ledger.vouches_for(PLAN.with_version(5))
    assert not ledger.vouches_for(PLAN.with_version(3))
    assert not ledger.vouches_for(other_contents(ours))
    assert Ledger(4, 4, "").vouches_for(other_contents(ours))  # no digest known: the version
    with pytest.raises(ValueError, match="never go back"):
        ledger.recorded(PLAN.with_version(3))


def test_a_foreign_plan_is_the_desired_version_or_newer_with_other_contents() -> None:
    ours = PLAN.with_version(4)
    ledger = Ledger(4, 3, ours.digest())
    assert ledger.is_ours(4, ours.digest()) and not ledger.foreign(4, ours.digest())
    assert ledger.foreign(4, "someone else's") and ledger.foreign(9, "someone else's")
    assert not ledger.foreign(3, "an older plan")  # behind: the hand-off brings it forward
    again, after = ledger.issue(ours, above=9)
    assert again.version == 10 and after == Ledger(10, 3, again.digest())
    assert again.slots == ours.slots


def test_a_plan_lost_from_status_is_recognised_by_its_annotation() -> None:
    ledger = Ledger(4, 4, "d4")
    assert ledger.lost_in_status(5, annotated=5)
    assert not ledger.lost_in_status(5, annotated=None)  # not a rebalance's record
    assert not ledger.lost_in_status(4, annotated=4)  # status knows it


def test_no_version_beyond_the_bound() -> None:
    with pytest.raises(NoVersionLeft) as error:
        Ledger(MAX_PLAN_VERSION, 0).next_version()
    assert error.value.last == MAX_PLAN_VERSION and isinstance(error.value, PlanError)
    with pytest.raises(NoVersionLeft):
        Ledger(3, 0).issue(PLAN, above=MAX_PLAN_VERSION)
    assert Ledger(MAX_PLAN_VERSION - 1, 0).next_version() == MAX_PLAN_VERSION


event = st.one_of(
    st.just(("issue", 0)),  # a rebalance
    st.tuples(st.just("serve"), st.integers(0, 40)),  # the leader says what it serves
    st.tuples(st.just("foreign"), st.integers(0, 5)),  # someone's plan, desired + n
    st.tuples(st.just("record"), st.integers(-6, 6)),  # a stored plan, desired + n // 2
    st.just(("restart", 0)),  # status written and read back by a new operator
)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=30))
def test_versions_never_go_back_and_none_is_issued_twice(events: list[tuple[str, int]]) -> None:
    ledger, issued, seen = Ledger(), [], {0}
    for kind, number in events:
        before = ledger
        if kind == "issue":
            plan, ledger = ledger.issue(PLAN)
            assert plan.version > max(seen)
            issued.append(plan.version)
        elif kind == "serve":  # ours or an older plan (newer ones are foreign)
            ledger = ledger.serving(number % (ledger.desired + 1))
        elif kind == "foreign":
            version = ledger.desired + number
            assert ledger.foreign(version, "someone else's")
            plan, ledger = ledger.issue(PLAN, above=version)
            assert plan.version > max(seen | {version})
            issued.append(plan.version)
            seen.add(version)
        elif kind == "record":  # odd: someone's contents
            stored = PLAN.with_version(max(1, ledger.desired + number // 2))
            stored = other_contents(stored) if number % 2 else stored
            replaced = stored.version == ledger.desired and stored.digest() != ledger.digest
            if stored.version < ledger.desired or (replaced and ledger.digest):
                with pytest.raises(ValueError, match="never go back"):
                    ledger.recorded(stored)
            else:
                ledger = ledger.recorded(stored)
                assert (ledger.desired, ledger.digest) == (stored.version, stored.digest())
        else:
            ledger = Ledger.from_status(status_of(ledger))
        assert ledger.desired >= before.desired
        seen |= {ledger.desired, ledger.applied}
    assert len(issued) == len(set(issued)) and issued == sorted(issued)
