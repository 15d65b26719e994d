"""The plan's durable record: kept when it can be trusted, restored or reset, never rolled back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_contract.plan import MAX_PLAN_VERSION, Plan, PlanError, round_robin_plan
from moe_operator.planning.ledger import Ledger
from moe_operator.planning.record import PlanShape, choose_plan
from tests.plan_fixtures import EXPERTS, INVALID, LAYERS, VALID, WORLD, plan

SHAPE = PlanShape(layers=2, experts=4, world=2, slots_per_rank=3)


def rebalanced(version: int) -> Plan:
    """A plan the rebalancer would have issued: not the round-robin start."""
    slots = (((0, 0, 2), (1, 2, 3)),) * 2
    return Plan(version=version, slotsPerRank=3, slots=slots, method="Replace")


def no_leader() -> None:
    return None


def leader_says(plan: Plan):  # type: ignore[no-untyped-def]
    asked: list[bool] = []

    def leader() -> Plan:
        asked.append(True)
        return plan

    leader.asked = asked  # type: ignore[attr-defined]
    return leader


def test_a_new_deployment_starts_from_round_robin_version_1() -> None:
    choice = choose_plan(SHAPE, None, None, Ledger(), no_leader)
    assert choice.write and choice.plan.version == 1 and choice.plan.method == "RoundRobin"


def test_a_trusted_record_is_kept_without_asking_the_leader() -> None:
    plan = rebalanced(4)
    leader = leader_says(rebalanced(9))
    choice = choose_plan(SHAPE, plan, None, Ledger(4, 4, plan.digest()), leader)
    assert not choice.write and choice.plan == plan and not leader.asked


def test_a_record_newer_than_status_is_kept() -> None:
    """The operator died after writing plan 5 and before status said so."""
    choice = choose_plan(SHAPE, rebalanced(5), None, Ledger(4, 4, "digest-of-4"), no_leader)
    assert not choice.write and choice.plan.version == 5


@pytest.mark.parametrize("problem", ["missing", "holds an unreadable plan (not JSON)"])
def test_a_lost_record_is_restored_from_the_leader(problem: str) -> None:
    serving = rebalanced(4)
    choice = choose_plan(SHAPE, None, problem, Ledger(4, 4, serving.digest()), leader_says(serving))
    assert choice.write and choice.plan == serving
    assert "restored plan 4 from the leader" in choice.reason and problem in choice.reason


def test_a_lost_record_without_a_leader_moves_forward_never_back() -> None:
    """Issue 11, item 1: recreated as version 1 while status said 4; now 5, round-robin."""
    choice = choose_plan(SHAPE, None, "missing", Ledger(4, 3, "d"), no_leader)
    assert choice.write and choice.plan.version == 5 and choice.plan.method == "RoundRobin"
    assert SHAPE.problem(choice.plan) is None


def test_an_older_record_is_not_trusted() -> None:
    """Someone put a valid plan 1 back (kubectl apply of an old copy): versions never go back."""
    choice = choose_plan(SHAPE, SHAPE.round_robin(1), None, Ledger(4, 4, "d"), no_leader)
    assert choice.write and choice.plan.version == 5 and "older" in choice.reason


def test_the_same_version_with_other_contents_is_not_trusted() -> None:
    ours = rebalanced(4)
    forged = Plan.model_validate({**ours.to_document(), "method": "Forged"})
    choice = choose_plan(SHAPE, forged, None, Ledger(4, 4, ours.digest()), leader_says(forged))
    assert choice.write and choice.plan.version == 5 and choice.plan.method == "RoundRobin"


def test_a_leader_behind_status_is_not_restored_from() -> None:
    choice = choose_plan(SHAPE, None, "missing", Ledger(4, 4, "d"), leader_says(rebalanced(3)))
    assert choice.plan.version == 5


def test_a_leader_of_another_shape_is_not_restored_from() -> None:
    """A new model shape: the old group's plan does not fit; a fresh plan above every version."""
    bigger = PlanShape(layers=4, experts=4, world=2, slots_per_rank=3)
    choice = choose_plan(bigger, None, "has no key", Ledger(4, 4, "d"), leader_says(rebalanced(6)))
    assert choice.plan.version == 7 and bigger.problem(choice.plan) is None


def test_other_keys_versions_count() -> None:
    choice = choose_plan(SHAPE, None, "missing", Ledger(2, 2, ""), no_leader, other_versions=[8])
    assert choice.plan.version == 9


def test_no_version_beyond_the_bound() -> None:
    with pytest.raises(PlanError, match="version"):
        choose_plan(SHAPE, None, "missing", Ledger(MAX_PLAN_VERSION, 0, ""), no_leader)


@given(
    desired=st.integers(0, 1000),
    applied=st.integers(0, 1000),
    stored=st.one_of(st.none(), st.integers(1, 1200)),
    served=st.one_of(st.none(), st.integers(1, 1200)),
)
def test_the_record_never_goes_below_what_was_issued(
    desired: int, applied: int, stored: int | None, served: int | None
) -> None:
    stored_plan = rebalanced(stored) if stored else None
    served_plan = rebalanced(served) if served else None
    choice = choose_plan(
        SHAPE,
        stored_plan,
        None if stored_plan else "missing",
        Ledger(desired, applied, ""),
        lambda: served_plan,
    )
    assert choice.plan.version >= desired
    assert SHAPE.problem(choice.plan) is None
    if choice.write and choice.plan not in (stored_plan, served_plan):
        assert choice.plan.version > max(desired, applied, stored or 0, served or 0)


def test_a_plan_grown_into_spare_memory_fits_its_shape_up_to_the_maximum() -> None:
    shape = PlanShape(layers=2, experts=4, world=4, slots_per_rank=1, max_slots_per_rank=2)
    assert shape.problem(round_robin_plan(2, 4, 4, 2)) is None  # grown online: still ours
    assert "exceeds the 2 slots" in (shape.problem(round_robin_plan(2, 4, 4, 3)) or "")
    assert shape.key == PlanShape(2, 4, 4, 1).key  # the key is the starting shape's
    fixed = PlanShape(layers=2, experts=4, world=4, slots_per_rank=2)
    assert "the spec says 2" in (fixed.problem(round_robin_plan(2, 4, 4, 1)) or "")


# --- the plan fixtures the worker's tests read too (tests/fixtures/plans) ----------------------


def test_the_record_starts_from_the_shared_round_robin_fixture() -> None:
    choice = choose_plan(PlanShape(LAYERS, EXPERTS, WORLD, 1), None, None, Ledger(), no_leader)
    assert choice.plan == plan("round-robin-2layer-4expert-4rank.json")


@pytest.mark.parametrize("name", VALID)
def test_a_shared_fixture_of_the_shape_is_kept_as_the_record(name: str) -> None:
    stored = plan(name)
    shape = PlanShape(LAYERS, EXPERTS, WORLD, stored.slots_per_rank)
    issued = Ledger(stored.version, stored.version, stored.digest())
    choice = choose_plan(shape, stored, None, issued, leader_says(rebalanced(9)))
    assert not choice.write and choice.plan == stored


@pytest.mark.parametrize(("name", "field"), INVALID.items())
def test_an_invalid_shared_fixture_is_never_the_record(name: str, field: str) -> None:
    """The worker refuses these (422); the operator never keeps one as its record either, and
    the plan that replaces it is newer than the refused one (version 10)."""
    stored, shape = plan(name), PlanShape(LAYERS, EXPERTS, WORLD, 1)
    assert field in (shape.problem(stored) or "")
    choice = choose_plan(shape, stored, None, Ledger(), no_leader)
    assert choice.write and choice.plan.version == 11 and field in choice.reason
    assert shape.problem(choice.plan) is None
