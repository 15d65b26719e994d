"""A group that keeps serving without a lost rank (issue 22, item 6): the pure decision of one run
(no whole-group replacement for a non-leader rank; the leader's loss and no room still replace
it), what a pod event tells the leader, status and Events."""

from __future__ import annotations

from typing import Any

from moe_contract.group import DEGRADED, REJOINING, SERVING, GroupStatus
from moe_contract.plan import round_robin_plan
from moe_operator.group import RECOVERING_REASON, REVISION_LABEL, PodRef
from moe_operator.rankloss import (
    RANK_LOST,
    REJOINING_REASON,
    lost_report,
    rank_loss,
    transition_events,
)
from moe_operator.recovery import GroupView, decide
from moe_operator.status import Observed, build_status, plan_redundancy

NOW = 1_000_000.0
WORLD = 4
ELASTIC = GroupStatus(epoch=0, world=WORLD, live=(0, 1, 2, 3))


def sts() -> dict[str, Any]:
    status = {"observedGeneration": 2, "updateRevision": "r2", "readyReplicas": WORLD}
    return {"metadata": {"generation": 2}, "status": status}


def pod(rank: int, **worker: Any) -> dict[str, Any]:
    meta = {"name": f"m-{rank}", "uid": f"u{rank}", "labels": {REVISION_LABEL: "r2"}}
    status = {"name": "worker", "state": {"running": {}}, "restartCount": 0, **worker}
    return {"metadata": meta, "status": {"containerStatuses": [status]}}


def exited(rank: int, message: str = "rank 3 was killed by SIGKILL") -> dict[str, Any]:
    terminated = {"exitCode": 137, "reason": "Error", "message": message}
    return pod(rank, state={"terminated": terminated}, restartCount=0)


def restarted(rank: int) -> dict[str, Any]:
    """Back and running after its worker exited (the kubelet restarted the container)."""
    return pod(rank, restartCount=1, lastState={"terminated": {"exitCode": 137}})


def view(
    pods: list[dict[str, Any]],
    membership: GroupStatus | None = ELASTIC,
    slots: int = 3,
    max_slots: int | None = 3,
) -> GroupView:
    plan = round_robin_plan(2, 8, WORLD, slots)
    return GroupView(
        sts(), pods, WORLD, WORLD - 1, {}, membership=membership, plan=plan, max_slots=max_slots
    )


def test_a_lost_non_leader_rank_leaves_the_group_serving_degraded() -> None:
    lost = GroupStatus(epoch=1, world=WORLD, live=(0, 1, 2), resumed_requests=3)
    action = decide(view([pod(0), pod(1), pod(2), exited(3)], lost), NOW)
    assert action.delete == () and not action.replacing and action.recovering is None
    assert action.rank_loss is not None and action.rank_loss.reason == RANK_LOST
    message = action.rank_loss.message
    assert "rank 3: pod m-3 exited with code 137" in message and "3 of 4 ranks serve" in message
    assert "epoch 1" in message and "3 requests resumed" in message
    # Back in (its container restarted): Rejoining while its experts come, then nothing to say.
    back = GroupStatus(epoch=2, world=WORLD, live=(0, 1, 2, 3), joining=(3,), state=REJOINING)
    action = decide(view([pod(0), pod(1), pod(2), restarted(3)], back), NOW)
    assert action.delete == () and action.rank_loss is not None
    assert action.rank_loss.reason == REJOINING_REASON
    whole = GroupStatus(epoch=2, world=WORLD, live=(0, 1, 2, 3), state=SERVING)
    action = decide(view([pod(0), pod(1), pod(2), restarted(3)], whole), NOW)
    assert action.delete == () and action.rank_loss is None and action.recovering is None


def test_the_leaders_loss_and_old_workers_still_replace_the_whole_group() -> None:
    everyone = (PodRef("m-0", "u0"), PodRef("m-1", "u1"), PodRef("m-2", "u2"), PodRef("m-3", "u3"))
    action = decide(view([exited(0), pod(1), pod(2), pod(3)]), NOW)
    assert action.delete == everyone and action.replacing and action.rank_loss is None
    # Workers with no membership of their own (an older image): any rank's loss, as before.
    action = decide(view([pod(0), pod(1), pod(2), exited(3)], membership=None), NOW)
    assert action.delete == everyone and action.recovering is not None


def test_no_room_for_the_orphans_replaces_the_whole_group_and_says_why() -> None:
    # One slot per rank: every expert on one rank only, and no spare memory to take them.
    lost = GroupStatus(epoch=1, world=WORLD, live=(0, 1, 2), state=DEGRADED)
    action = decide(view([pod(0), pod(1), pod(2), exited(3)], lost, slots=2, max_slots=2), NOW)
    assert len(action.delete) == WORLD and action.replacing
    assert action.recovering is not None
    assert action.recovering.startswith("no room for the lost ranks' experts: slots[0]")
    assert "maxSlotsPerRank" in action.recovering
    (_, reason, message) = action.deletion or ("", "", "")
    assert reason == RECOVERING_REASON and "no room" in message
    # With spare memory the same loss is survived.
    action = decide(view([pod(0), pod(1), pod(2), exited(3)], lost, slots=2, max_slots=3), NOW)
    assert action.delete == () and action.rank_loss is not None
    # The leader stopped itself for want of room (its pod failed too): status still says why;
    # the leader's loss alone says nothing of room.
    action = decide(view([exited(0), pod(1), pod(2), exited(3)], lost, slots=2, max_slots=2), NOW)
    assert len(action.delete) == WORLD and action.recovering is not None
    assert action.recovering.startswith("no room for the lost ranks' experts: slots[0]")
    action = decide(view([exited(0), pod(1), pod(2), pod(3)], lost, slots=2, max_slots=2), NOW)
    assert len(action.delete) == WORLD and "no room" not in (action.recovering or "")
    assert rank_loss(lost, [exited(0), pod(1), pod(2), exited(3)], 1) is None  # never RankLost


def test_a_pod_event_names_the_ranks_lost_never_the_leaders_nor_a_starting_pod() -> None:
    assert lost_report(exited(3), "MODIFIED", 1) == (
        [3],
        "pod m-3: exited with code 137: rank 3 was killed by SIGKILL",
    )
    assert lost_report(exited(1), "MODIFIED", 2) == ([2, 3], lost_report(exited(1), "", 2)[1])
    assert lost_report(pod(2), "DELETED", 1) == ([2], "pod m-2 deleted")
    assert lost_report(exited(0), "MODIFIED", 1) is None  # the leader: a whole-group restart
    assert lost_report(pod(2), "MODIFIED", 1) is None  # runs
    assert lost_report(restarted(2), "MODIFIED", 1) is None  # back, joining the group
    starting = pod(2, state={"waiting": {"reason": "ContainerCreating"}})
    assert lost_report(starting, "ADDED", 1) is None
    crashing = pod(2, state={"waiting": {"reason": "CrashLoopBackOff"}},
                   lastState={"terminated": {"exitCode": 1}})  # fmt: skip
    assert lost_report(crashing, "MODIFIED", 1) is not None


def test_status_and_events_of_a_rank_lost_and_back() -> None:
    lost = GroupStatus(epoch=1, world=WORLD, live=(0, 1, 2), resumed_requests=2, state=DEGRADED)
    action = decide(view([pod(0), pod(1), pod(2), exited(3)], lost), NOW)
    status = build_status(
        Observed(
            generation=1, workers=WORLD, statefulset_exists=True, ready_workers=3,
            was_running=True, rank_loss=action.rank_loss, membership=lost,
            redundancy=plan_redundancy(round_robin_plan(2, 8, WORLD, 3), 1),
        ),
        [],
        "2026-01-01T00:00:00Z",
    )  # fmt: skip
    assert status.phase == "Degraded"
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Degraded"].status == "True" and conditions["Degraded"].reason == RANK_LOST
    assert conditions["Ready"].status == "True"  # the survivors serve
    assert status.membership is not None and status.membership.lost_ranks == [3]
    assert status.membership.epoch == 1 and status.membership.resumed_requests == 2
    assert status.redundancy is not None and status.redundancy.single_replica_experts == 4
    previous = {"conditions": [c.model_dump(by_alias=True) for c in status.conditions]}
    ((kind, reason, _),) = transition_events({}, action.rank_loss, lost)
    assert (kind, reason) == ("Warning", RANK_LOST)
    assert transition_events(previous, action.rank_loss, lost) == []  # posted once
    whole = GroupStatus(epoch=2, world=WORLD, live=(0, 1, 2, 3))
    ((kind, reason, message),) = transition_events(previous, None, whole)
    assert (kind, reason) == ("Normal", "GroupWhole") and "epoch 2" in message


def test_redundancy_of_the_plan_of_record_by_pod() -> None:
    # 8 experts, 4 ranks of 4 slots in pods of 2: round-robin puts each expert twice.
    found = plan_redundancy(round_robin_plan(1, 8, 4, 4), 2)
    assert found.single_replica_experts == 0
    assert plan_redundancy(round_robin_plan(1, 8, 4, 2), 1).single_replica_experts == 8
