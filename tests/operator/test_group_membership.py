"""Replica groups (issue 23) with the survivors' membership (issue 22) and the held start-up
refusal (issue 19): each group reads its own recorded membership and rank-loss passage
(status.groups[]), so one group's lost rank neither says nor hides anything of another's; a
refusal held for the spec generation holds the groups on the spec's template only."""

from __future__ import annotations

from typing import Any

from moe_contract.group import DEGRADED, GroupStatus
from moe_operator.groups.report import group_previous
from moe_operator.rankloss import RANK_LOST, membership_of, transition_events
from moe_operator.recovery import GroupView, decide
from tests.operator.test_rank_loss import ELASTIC, NOW, WORLD, exited, pod, view
from tests.operator.test_recovery import refused

LOST = GroupStatus(epoch=1, world=WORLD, live=(0, 1, 2), resumed_requests=2, state=DEGRADED)
LOST_DOC = {"epoch": 1, "ranks": WORLD, "liveRanks": [0, 1, 2], "lostRanks": [3],
            "state": "Degraded", "resumedRequests": 2}  # fmt: skip


def _status(**fields: Any) -> dict[str, Any]:
    """Group 1 serves without rank 3 (the top-level Degraded condition and membership are its
    own); group 0 serves whole."""
    degraded = {"type": "Degraded", "status": "True", "reason": RANK_LOST, "message": "m-g1: ..."}
    groups = [
        {"name": "m", "index": 0, "membership": {"epoch": 0, "ranks": WORLD}},
        {"name": "m-g1", "index": 1, "membership": LOST_DOC, "degraded": RANK_LOST},
    ]
    return {"conditions": [degraded], "membership": LOST_DOC, "groups": groups, **fields}


def test_each_group_reads_its_own_membership_and_rank_loss() -> None:
    status = _status()
    mine, other = group_previous(status, 1), group_previous(status, 0)
    assert membership_of(mine) == LOST and membership_of(other) != LOST
    # Group 1's loss goes on without a second RankLost Event; group 0, whole, posts nothing,
    # nor GroupWhole for a loss that was group 1's.
    loss = decide(view([pod(0), pod(1), pod(2), exited(3)], LOST), NOW).rank_loss
    assert loss is not None and loss.reason == RANK_LOST
    assert transition_events(mine, loss, LOST) == []
    assert transition_events(other, None, ELASTIC) == []
    # Group 0 losing a rank of its own says so once, though group 1's loss is on the top level.
    ((kind, reason, _),) = transition_events(other, loss, LOST)
    assert (kind, reason) == ("Warning", RANK_LOST)
    # Group 1 whole again: GroupWhole from its own passage.
    ((_, reason, _),) = transition_events(mine, None, ELASTIC)
    assert reason == "GroupWhole"


def test_a_new_group_starts_with_no_membership_nor_loss() -> None:
    previous = group_previous(_status(), 2)
    assert membership_of(previous) is None and transition_events(previous, None, ELASTIC) == []


def test_group_0_takes_the_top_level_fields_an_older_operator_wrote() -> None:
    status = {"membership": LOST_DOC, "conditions": _status()["conditions"]}
    previous = group_previous(status, 0)
    assert membership_of(previous) == LOST
    assert transition_events(previous, None, ELASTIC)[0][1] == "GroupWhole"


def test_a_held_refusal_holds_the_groups_on_the_specs_template_only() -> None:
    refusal = decide(view([refused(0), pod(1)], None), NOW).failure
    assert refusal is not None
    status = _status(refusal=refusal.record(7))
    running = [pod(0), pod(1), pod(2), pod(3)]
    for index in (0, 1):
        current = GroupView(
            view(running).statefulset, running, WORLD, WORLD,
            group_previous(status, index, current=True), 7,
        )  # fmt: skip
        held = decide(current, NOW)
        assert held.hold and held.failure == refusal and held.delete == ()
    # A group of the older template, serving through a surge update, is not held.
    old = GroupView(
        view(running).statefulset, running, WORLD, WORLD,
        group_previous(status, 0, current=False), 7,
    )  # fmt: skip
    action = decide(old, NOW)
    assert not action.hold and action.failure is None
