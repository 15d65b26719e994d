"""What a run reports of its replica groups (pure): each group as read with its recovery
decision (`GroupRun`), the part of the previous status each group's recovery reads, and the
status fields drawn from all of them (status.groups, the refusal, the rank loss and membership
shown, the rollout message)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator import api
from moe_operator.group import GroupState, ReplacementBackoff
from moe_operator.groups.read import GroupRead
from moe_operator.groups.rollout import Rollout
from moe_operator.rankloss import RANK_LOST, REJOINING_REASON, RankLoss
from moe_operator.recovery import GroupAction, GroupView
from moe_operator.status import membership_status, recovery_status


@dataclass(frozen=True)
class GroupRun:
    """One group in this run: as read, and what its recovery decision said."""

    read: GroupRead
    view: GroupView
    action: GroupAction
    state: GroupState

    def takes_plans(self, pods: int) -> bool:
        """Current, whole, settled and taking traffic: plans may be handed to its leader."""
        read = self.read
        return (
            read.current
            and read.drain is None
            and read.serving(pods)
            and self.state.settled
            and self.action.recovering is None
        )


def named_index(group: GroupRead, message: str) -> str:
    return message if group.index == 0 else f"{group.name}: {message}"


def group_previous(base: dict[str, Any], index: int, *, current: bool = True) -> dict[str, Any]:
    """The previous status as one group's recovery reads it: its own replacement backoff
    (status.groups[].recovery), so one failing group never holds another back, its own
    membership (status.groups[].membership) and rank-loss passage (groups[].degraded, as the
    Degraded condition transition_events reads). Group 0 with no entry of its own (an operator
    before replica groups wrote the status) takes the top-level fields. A refusal is held for
    the spec's pod template: a group of an older one (serving on through a surge) is not held."""
    entries = [g for g in base.get("groups") or [] if isinstance(g, dict)]
    own = next((g for g in entries if g.get("index") == index), None)
    refusal = base.get("refusal") if current else None
    if own is None and index == 0 and not entries:
        return {**base, "refusal": refusal}
    own = own or {}
    conditions = [
        c for c in base.get("conditions") or []
        if not (c.get("type") == "Degraded" and c.get("reason") in (RANK_LOST, REJOINING_REASON))
    ]  # fmt: skip
    if own.get("degraded"):
        conditions.append({"type": "Degraded", "status": "True", "reason": own["degraded"]})
    return {
        **base,
        "recovery": own.get("recovery"),
        "membership": own.get("membership"),
        "conditions": conditions,
        "refusal": refusal,
    }


def refusal(runs: list[GroupRun], generation: int) -> dict[str, Any] | None:
    """status.refusal: the first group's refusal held for the spec generation (every group on
    the spec's pod template would refuse it the same way: all of them are held)."""
    for run in runs:
        if run.action.failure is not None and run.action.hold and run.read.current:
            return run.action.failure.record(generation)
    return None


def named_loss(run: GroupRun | None) -> RankLoss | None:
    """The Degraded reason of the first group serving without some ranks, its message naming
    the group after the first."""
    if run is None or run.action.rank_loss is None:
        return None
    loss = run.action.rank_loss
    return dataclasses.replace(loss, message=named(run, loss.message))


def membership_shown(runs: list[GroupRun], loss: GroupRun | None) -> GroupStatus | None:
    """status.membership: the group's serving without some ranks, else group 0's (each group's
    own is in status.groups[].membership)."""
    if loss is not None and loss.view.membership is not None:
        return loss.view.membership
    return runs[0].view.membership if runs and runs[0].read.index == 0 else None


def forming(run: GroupRun, pods: int) -> bool:
    """A group whose pods are not all there yet (new, or just replaced): it forms. A group held
    at 0 pods for a refusal does not (phase Failed: restarting fails the same way)."""
    live = [p for p in run.read.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    return len(live) < pods and run.action.recovering is None and run.action.failure is None


def named(run: GroupRun, message: str | None) -> str:
    """A group's message; groups after the first are named (group 0 says what it always did)."""
    return message or "" if run.read.index == 0 else f"{run.read.name}: {message}"


def rollout_message(rollout: Rollout, restarting: list[GroupRun], pods: int) -> str:
    parts = [
        named(run, run.state.message(pods) if run.action.restarting else "forming")
        for run in restarting
    ]
    if rollout.waiting:
        parts.append(rollout.waiting)
    return "; ".join(parts) or "starting the groups"


def last_replaced(runs: list[GroupRun]) -> ReplacementBackoff | None:
    """status.recovery: the backoff of the group replaced last (each group keeps its own)."""
    replaced = [run.action.backoff for run in runs if run.action.backoff.replacements]
    if not replaced:
        return runs[0].action.backoff if runs else None
    return max(replaced, key=lambda backoff: backoff.last_at or 0.0)


def groups_seen(
    spec: api.MoEDeploymentSpec, runs: list[GroupRun], served: Mapping[int, int | None]
) -> tuple[api.ReplicaGroupStatus, ...]:
    """status.groups: each group's phase, readiness, served plan (its leader's last answer,
    `served`), backoff and membership."""
    found = []
    for run in runs:
        read = run.read
        loss = run.action.rank_loss
        if read.drain is not None:
            phase = "Draining"
        elif run.action.failure is not None:
            phase = "Failed"
        elif run.action.recovering or run.state.restarting:
            phase = "Restarting"
        elif loss is not None:
            phase = "Degraded"
        elif not read.current:
            phase = "Outdated"
        else:
            phase = "Serving" if read.serving(spec.pods) else "Starting"
        found.append(
            api.ReplicaGroupStatus(
                name=read.name,
                index=read.index,
                phase=phase,
                ready=f"{min(read.ready, spec.pods)}/{spec.pods}",
                served_plan_version=served.get(read.index) or 0,
                current=read.current,
                recovery=recovery_status(run.action.backoff)
                if run.action.backoff.replacements
                else None,
                membership=membership_status(run.view.membership)
                if run.view.membership is not None
                else None,
                degraded=loss.reason if loss is not None else "",
            )
        )
    return tuple(found)


def loads_problem(
    window_problem: str | None, runs: list[GroupRun], spec: api.MoEDeploymentSpec
) -> str | None:
    """Why counters were not read: no group takes plans (workers not ready, a group restart),
    or the last window's reason (kept by the window, so every run between two reads reports
    the same)."""
    if not any(run.takes_plans(spec.pods) for run in runs):
        if any(not run.state.settled for run in runs):
            return "the group restarts for a new pod template; token counters not read"
        ready = sum(min(run.read.ready, spec.pods) for run in runs)
        world = spec.pods * max(1, len(runs))
        return f"{world - ready} of {world} workers not ready; token counters not read"
    return window_problem


def balance_note(plan: Plan) -> str:
    if plan.gate_bias is None:
        return ""
    return "; gate bias active: routing differs from the model's own choice of experts"
