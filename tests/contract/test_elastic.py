"""The plan the survivors serve (`moe_contract.elastic.degraded_plan`), what a plan change moves
between live ranks, and how a plan anticipates a loss: pure, against hand-made placements and a
hypothesis property over random ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.elastic import (
    NoRoom,
    degraded_plan,
    domain_of,
    redundancy,
    spread_replicas,
)
from moe_contract.plan import (
    FROM_WEIGHTS,
    Plan,
    PlanError,
    parse_plan,
    plan_transfers,
    round_robin_plan,
    validate_plan,
)


def plan_of(layer: list[list[int]], *, per_pod: int | None = None, version: int = 3) -> Plan:
    return Plan(
        version=version,
        slotsPerRank=len(layer[0]),
        slots=(tuple(tuple(row) for row in layer),),
        ranksPerPod=per_pod,
    )


def served(plan: Plan) -> set[int]:
    return {e for layer in plan.slots for row in layer for e in row}


def test_an_expert_on_the_lost_rank_only_takes_a_spare_replica_slot() -> None:
    # Expert 3 lives on rank 3 only; expert 0 has two replicas (ranks 0 and 1).
    plan = plan_of([[0, 1], [0, 2], [1, 2], [3, 1]])
    degraded = degraded_plan(plan, [0, 1, 2])
    validate_plan(degraded, num_layers=1, num_experts=4, world_size=4)
    assert degraded.absent_ranks == (3,) and degraded.slots[0][3] == ()
    assert degraded.version == plan.version and degraded.digest() != plan.digest()
    assert served(degraded) == {0, 1, 2, 3}
    # One slot changed: the orphan, read from the weights (no live rank holds it).
    transfers = plan_transfers(plan, degraded)
    assert [(t.expert, t.src) for t in transfers] == [(3, FROM_WEIGHTS)]
    changed = [
        (rank, slot)
        for rank in range(3)
        for slot in range(2)
        if plan.slots[0][rank][slot] != degraded.slots[0][rank][slot]
    ]
    assert len(changed) == 1


def test_redundant_experts_lose_nothing_and_move_nothing() -> None:
    plan = round_robin_plan(2, 4, 4, 2)  # every expert on two ranks
    degraded = degraded_plan(plan, [0, 1, 3])
    assert plan_transfers(plan, degraded) == []
    assert [row for row in degraded.slots[0]] == [
        plan.slots[0][0],
        plan.slots[0][1],
        (),
        plan.slots[0][3],
    ]


def test_spare_memory_is_used_before_any_replica_is_given_up() -> None:
    plan = round_robin_plan(1, 4, 4, 1)  # one replica each
    degraded = degraded_plan(plan, [0, 1, 2], max_slots_per_rank=2)
    assert degraded.slots_per_rank == 2
    assert served(degraded) == {0, 1, 2, 3}
    # The grown slots hold the orphan and local copies: only the orphan travels (from weights).
    assert [(t.expert, t.dst, t.src) for t in plan_transfers(plan, degraded)] == [
        (3, 0, FROM_WEIGHTS)
    ]


def test_no_room_names_the_layer_the_experts_and_the_fix() -> None:
    plan = round_robin_plan(2, 4, 4, 1)
    with pytest.raises(NoRoom, match=r"slots\[0\]: experts \[2\].*maxSlotsPerRank"):
        degraded_plan(plan, [0, 1, 3])


def test_a_replica_in_a_pod_that_keeps_another_is_given_up_first() -> None:
    # Pods of 2 ranks: {0, 1}, {2, 3}, {4, 5}. Expert 0 has 3 replicas: ranks 0, 1 (pod 0) and 2
    # (pod 1). Expert 5 lives on rank 5 only. Losing rank 5 must take the pod-0 replica that
    # another pod-0 replica backs, never expert 0's only replica in pod 1.
    plan = plan_of([[0, 1], [0, 2], [0, 3], [1, 4], [2, 3], [4, 5]], per_pod=2)
    degraded = degraded_plan(plan, [0, 1, 2, 3, 4])
    places = {r for r, row in enumerate(degraded.slots[0]) for e in row if e == 0}
    assert len(places) == 2 and {domain_of(r, 2) for r in places} == {0, 1}
    assert served(degraded) == set(range(6))


def test_a_second_loss_degrades_the_degraded_plan_and_growing_back_restores_the_plan() -> None:
    plan = round_robin_plan(2, 4, 4, 2)
    once = degraded_plan(plan, [0, 1, 2])
    twice = degraded_plan(once, [0, 2])
    assert twice.absent_ranks == (1, 3) and served(twice) == {0, 1, 2, 3}
    # Growing back: computed from the full plan, never from a plan the returning rank is absent in.
    with pytest.raises(PlanError, match="hold no slot"):
        degraded_plan(twice, [0, 1, 2])
    assert degraded_plan(plan, [0, 1, 2, 3]) is plan
    back = degraded_plan(plan, [0, 1, 2])
    moves = plan_transfers(twice, back)
    assert {t.dst for t in moves} == {1} and all(t.src in (0, 2) for t in moves)


def test_the_leader_never_absent_and_the_document_round_trips() -> None:
    plan = round_robin_plan(1, 4, 4, 2)
    with pytest.raises(PlanError, match="rank 0"):
        degraded_plan(plan, [1, 2, 3])
    degraded = degraded_plan(plan, [0, 2, 3])
    assert parse_plan(degraded.to_json()) == degraded
    assert "absentRanks" not in plan.to_json()  # the operator's plans and digests are unchanged
    bad = degraded.to_document() | {"absentRanks": [1, 1]}
    with pytest.raises(PlanError, match="absentRanks"):
        validate_plan(parse_plan(bad), num_layers=1, num_experts=4, world_size=4)


@st.composite
def placements(draw: st.DrawFn) -> tuple[Plan, list[int], int | None, int]:
    per_pod = draw(st.sampled_from([None, 2]))
    ranks = draw(st.sampled_from([4, 6, 8]))
    experts = draw(st.integers(2, 2 * ranks))
    size = draw(st.integers(max(1, -(-experts // ranks)), 4))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        flat = list(range(experts)) + draw(
            st.lists(st.integers(0, experts - 1), min_size=ranks * size - experts,
                     max_size=ranks * size - experts)
        )  # fmt: skip
        flat = draw(st.permutations(flat))
        layers.append(tuple(tuple(flat[r * size : (r + 1) * size]) for r in range(ranks)))
    plan = Plan(version=1, slotsPerRank=size, slots=tuple(layers), ranksPerPod=per_pod)
    lost = draw(st.sets(st.integers(1, ranks - 1), min_size=1, max_size=ranks - 2))
    most = draw(st.sampled_from([None, size + 1, size + 2]))
    return plan, sorted(set(range(ranks)) - lost), most, experts


@settings(max_examples=200, deadline=None)
@given(placements())
def test_every_expert_stays_served_with_the_fewest_moves(case: tuple) -> None:
    plan, live, most, experts = case
    try:
        degraded = degraded_plan(plan, live, max_slots_per_rank=most)
    except NoRoom:
        assert _tight(plan, live, most, experts)  # the live slots really cannot hold them
        return
    assert not _tight(plan, live, most, experts)
    validate_plan(
        degraded, num_layers=plan.num_layers, num_experts=experts, world_size=plan.world_size,
        max_slots_per_rank=most or plan.slots_per_rank,
    )  # fmt: skip
    assert set(degraded.present) == set(live)
    transfers = plan_transfers(plan, degraded)
    assert all(t.src == FROM_WEIGHTS for t in transfers)  # no live rank holds what travels
    for layer, (before, after) in enumerate(zip(plan.slots, degraded.slots, strict=True)):
        assert {e for row in after for e in row} == set(range(experts))
        orphans = {e for row in before for e in row} - {e for r in live for e in before[r]}
        # Fewest moves: each orphan travels once, and nothing else does.
        assert sorted(t.expert for t in transfers if t.layer == layer) == sorted(orphans)
        for rank in live:
            assert {e for e in after[rank] if e not in orphans} <= set(before[rank])


def _tight(plan: Plan, live: list[int], most: int | None, experts: int) -> bool:
    """No room is right when, in some layer, the orphans outnumber the grown slots plus the
    replicas that have another live copy."""
    grow = (most or plan.slots_per_rank) - plan.slots_per_rank
    for layer in plan.slots:
        held = [e for r in live for e in layer[r]]
        distinct = set(held)
        orphans = experts - len(distinct)
        spare = len(held) - len(distinct)
        if orphans > spare + grow * len(live):
            return True
    return False


def test_redundancy_counts_single_rank_and_single_pod_experts() -> None:
    # Pods {0,1}, {2,3}: expert 0 on ranks 0 and 1 (one pod), expert 1 on ranks 1 and 2 (two),
    # expert 2 on rank 3 only, expert 3 on ranks 0 and 3.
    plan = plan_of([[0, 3], [0, 1], [1, 1], [2, 3]], per_pod=2)
    found = redundancy(plan)
    assert found.single_replica == (1,) and found.single_domain == (2,)
    assert not found.survives_domain_loss
    assert redundancy(plan_of([[0, 1], [1, 2], [2, 3], [3, 0]])).survives_domain_loss


def test_spread_replicas_puts_every_expert_in_two_pods_where_slots_allow() -> None:
    # 4 ranks in pods of 2, 2 slots each, 4 experts: round-robin puts expert 0 on ranks 0 and 1
    # (one pod). Spread: every expert in both pods, loads of the layer only reassigned.
    plan = round_robin_plan(1, 4, 4, 2)
    assert redundancy(plan.model_copy(update={"ranks_per_pod": 2})).worst_single_domain > 0
    spread = spread_replicas(plan.slots, [[4.0, 3.0, 2.0, 1.0]], ranks_per_pod=2)
    after = plan.model_copy(update={"slots": spread, "ranks_per_pod": 2})
    assert redundancy(after).survives_domain_loss
    # Too few slots for two replicas each: left as it is.
    tight = round_robin_plan(1, 6, 4, 2)
    assert spread_replicas(tight.slots, [[1.0] * 6], 2) == tight.slots


@settings(max_examples=100, deadline=None)
@given(placements(), st.lists(st.floats(0, 100), min_size=16, max_size=16))
def test_spread_replicas_never_leaves_an_expert_unserved(case: tuple, loads: list) -> None:
    plan, _, _, experts = case
    load = [loads[:experts] + [1.0] * (experts - len(loads[:experts]))] * plan.num_layers
    spread = spread_replicas(plan.slots, load, plan.ranks_per_pod)
    for before, after in zip(plan.slots, spread, strict=True):
        assert [len(r) for r in before] == [len(r) for r in after]
        assert {e for row in after for e in row} == set(range(experts))
        if sum(map(len, before)) >= 2 * experts:
            lone_before = _lone(before, plan.ranks_per_pod)
            assert _lone(after, plan.ranks_per_pod) <= lone_before


def _lone(layer: tuple, per_pod: int | None) -> int:
    domains: dict[int, set[int]] = {}
    for rank, row in enumerate(layer):
        for e in row:
            domains.setdefault(e, set()).add(domain_of(rank, per_pod))
    return sum(len(d) < 2 for d in domains.values())
