"""What the operator does about its worker group in one run: one pure decision.

Pure. From the StatefulSet and its pods as read, the status the previous run wrote and the
clock, `decide` returns a `GroupAction`: the pods to delete together (and the Event that says
why) and what status says of the group. In order:

1. Pods of an older template are replaced together: one group restart per change (`group`).
2. Else a rank that died or restarted has the whole group replaced, unless the workers run
   their own membership and it is not the leader's: then the survivors serve without it and
   let it back in, and status says so (`rankloss`), unless they have no room for its experts;
   replacements in a row back off (`group.ReplacementBackoff`), and while one is held back
   status says when it will run.
3. A failure the group is recovering from stays in status until all its pods are back, ready.
4. Workers that refused to start (`failures`) are reported instead, and no pod is replaced:
   the spec or the checkpoint must change. The refusal is held for the spec's generation
   (`hold`: the StatefulSet goes to 0 pods, so neither the kubelet nor the operator restarts
   them) until the generation changes; a held refusal stands before rules 1 to 3.

An Event for a condition that lasts (a held replacement, a refusal) is posted once: when the
previous status does not say it yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator.failures import StartupFailure, startup_failure
from moe_operator.group import (
    RECOVERING_REASON,
    GroupState,
    PodRef,
    ReplacementBackoff,
    gang_failure,
    group_state,
)
from moe_operator.rankloss import RankLoss, keeps_serving, rank_loss

Event = tuple[str, str, str]  # (type, reason, message)


@dataclass(frozen=True)
class GroupView:
    """The group as this run reads it."""

    statefulset: dict[str, Any]
    pods: Sequence[dict[str, Any]]  # the StatefulSet's own pods
    world: int  # pods wanted (what the StatefulSet counts ready)
    ready: int  # the StatefulSet's readyReplicas
    previous: Mapping[str, Any]  # the status the previous run wrote
    generation: int = 0  # the spec's metadata.generation (a held refusal is for one)
    membership: GroupStatus | None = None  # the leader's (None: none of its own, or unknown)
    plan: Plan | None = None  # the plan of record (is there room without the lost ranks?)
    ranks_per_pod: int = 1
    max_slots: int | None = None  # placement.maxSlotsPerRank


@dataclass(frozen=True)
class GroupAction:
    """What to do about the group, and what status says of it."""

    group: GroupState  # as read
    delete: tuple[PodRef, ...] = ()  # delete these pods together (uid preconditions)
    deletion: Event | None = None  # the Event of the deletion, its message after the count
    replacing: bool = False  # the deleted pods start terminating: the group is restarting
    events: tuple[Event, ...] = ()  # post these now
    recovering: str | None = None  # the failure the group is brought back whole from
    restarting: bool = False  # a group restart for a new pod template is under way
    failure: StartupFailure | None = None  # workers refuse to start
    hold: bool = False  # the refusal is held: scale the group to 0 pods until the spec changes
    backoff: ReplacementBackoff = field(default_factory=ReplacementBackoff)
    rank_loss: RankLoss | None = None  # the group serves without some ranks (not replaced)

    def after_deleting(self, count: int) -> tuple[GroupState, tuple[Event, ...]]:
        """The group once `count` of the pods were deleted, and the Events to post."""
        group = self.group
        if self.replacing:
            group = dataclasses.replace(group, terminating=group.terminating + count)
        if self.deletion is None:
            return group, self.events
        kind, reason, message = self.deletion
        return group, ((kind, reason, f"deleted {count} pods{message}"), *self.events)


def _said(previous: Mapping[str, Any], news: str) -> bool:
    """Whether a condition the previous run wrote says `news` already."""
    return any(news in (item.get("message") or "") for item in previous.get("conditions") or [])


def _recovering_before(previous: Mapping[str, Any]) -> str | None:
    """The failure the previous status said the group recovers from."""
    for item in previous.get("conditions") or []:
        if item.get("type") == "Degraded" and item.get("reason") == RECOVERING_REASON:
            return str(item.get("message") or "") or None
    return None


def decide(view: GroupView, now: float) -> GroupAction:
    """The action for this run (see the module docstring for the rules)."""
    group = group_state(view.statefulset, view.pods)
    backoff = ReplacementBackoff.from_status(view.previous.get("recovery"))
    held = StartupFailure.held(view.previous.get("refusal"), view.generation)
    if held is not None:  # said when first seen; the pods go, nothing is replaced
        return GroupAction(group, failure=held, hold=True, backoff=backoff)
    back = group.current >= view.world and not group.restarting and view.ready >= view.world
    recovering = None if back else _recovering_before(view.previous)
    gang = None if group.restarting or not group.observed else gang_failure(view.pods)
    action = GroupAction(group, recovering=recovering, backoff=backoff)
    if group.stale:
        deletion = ("Normal", "GroupRestart", f" together: {group.message(view.world)}")
        action = dataclasses.replace(action, delete=group.stale, deletion=deletion)
    elif gang is not None and (carry_on := _carry_on(view))[0]:
        action = dataclasses.replace(action, rank_loss=_loss(view))
    elif gang is not None:
        no_room = carry_on[1]
        wait = backoff.wait_s(now)
        if wait > 0:
            in_a_row = backoff.in_a_row(now)
            held = gang.held_message(in_a_row, wait)
            news = f"replaced {in_a_row} times in a row"
            events = () if _said(view.previous, news) else (("Warning", "GroupBackoff", held),)
            action = dataclasses.replace(action, recovering=held, events=events)
        else:
            replacing = (
                f"{no_room}; {gang.message(view.world)}" if no_room else gang.message(view.world)
            )
            action = dataclasses.replace(
                action,
                delete=gang.pods,
                deletion=("Warning", RECOVERING_REASON, f": {replacing}"),
                replacing=True,
                recovering=replacing,
                backoff=backoff.replaced(now),
            )
    elif view.membership is not None and not group.restarting:
        action = dataclasses.replace(action, rank_loss=_loss(view))
    return _refusals(action, view)


def _carry_on(view: GroupView) -> tuple[bool, str | None]:
    return keeps_serving(
        view.membership,
        view.pods,
        view.plan,
        ranks_per_pod=view.ranks_per_pod,
        max_slots=view.max_slots,
    )


def _loss(view: GroupView) -> RankLoss | None:
    return rank_loss(view.membership, view.pods, view.ranks_per_pod)


def _refusals(action: GroupAction, view: GroupView) -> GroupAction:
    """A group restart under way, or workers refusing to start: they stand instead of a
    recovery (a refusal is no failure to recover from: the spec must change), and the
    replacement a rank that died beside them would have caused is not made."""
    group = action.group
    restarting = (group.restarting or not group.observed) and action.recovering is None
    failure = None if restarting else startup_failure(view.pods)
    if failure is None:
        return dataclasses.replace(action, restarting=restarting)
    event = ("Warning", failure.reason, failure.describe(view.world))
    events = () if _said(view.previous, failure.message) else (event,)
    backoff = ReplacementBackoff.from_status(view.previous.get("recovery"))
    return GroupAction(group, events=events, failure=failure, hold=True, backoff=backoff)
