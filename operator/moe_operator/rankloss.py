"""A group that keeps serving without a lost rank: what the operator does and says. Pure.

Workers that run their own membership (the leader answers GET /v1/group) survive a non-leader
rank: its survivors drop it at once, serve every expert on the ranks left
(`moe_contract.elastic.degraded_plan`) and let its replacement (the same pod, its container
restarted by the kubelet, or a new pod of the StatefulSet) back in. So the operator no longer
replaces the whole group for it; status says `Degraded` with reason `RankLost` (ranks missing)
or `Rejoining` (back, their experts on the way), the membership epoch and the live ranks.

The whole group is still replaced, as before, when:
- the leader's pod (rank 0) failed: it serves the rendezvous store and the API (the replica
  groups of another issue route around it);
- the live ranks have no room for the lost ranks' experts (`NoRoom`): the reason goes to
  status;
- the workers have no membership of their own (an older image): any rank lost breaks them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moe_contract import env as worker_env
from moe_contract.elastic import NoRoom, degraded_plan
from moe_contract.group import REGROUPING, GroupStatus
from moe_contract.plan import Plan, PlanError
from moe_operator.group import container_failure

RANK_LOST = "RankLost"
REJOINING_REASON = "Rejoining"


@dataclass(frozen=True)
class RankLoss:
    """The group serves without some ranks: status' Degraded reason and message."""

    reason: str  # RANK_LOST or REJOINING_REASON
    message: str
    group: GroupStatus | None


def membership_of(previous: Mapping[str, Any]) -> GroupStatus | None:
    """The membership the previous status recorded (status.membership), if any."""
    raw = previous.get("membership") or {}
    if not raw:
        return None
    return GroupStatus.from_document(
        {
            "epoch": raw.get("epoch"),
            "world": raw.get("ranks"),
            "liveRanks": raw.get("liveRanks"),
            "joiningRanks": raw.get("joiningRanks") or [],
            "state": raw.get("state"),
            "resumedRequests": raw.get("resumedRequests"),
        }
    )


def pod_ordinal(pod: Mapping[str, Any]) -> int | None:
    return worker_env.rank_from_pod_name(str((pod.get("metadata") or {}).get("name", "")))


def leader_failed(pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the leader's pod (ordinal 0) failed: its worker exited or restarted, or it is
    being deleted (the group's store and API go with it)."""
    for pod in pods:
        if pod_ordinal(pod) == 0:
            deleted = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
            return deleted or container_failure(dict(pod)) is not None
    return False


def down_ranks(pods: Sequence[Mapping[str, Any]], ranks_per_pod: int) -> dict[int, str]:
    """Ranks whose pod's worker does not run now (deleted, or exited and not yet back), with
    what happened to it."""
    down: dict[int, str] = {}
    for pod in pods:
        ordinal = pod_ordinal(pod)
        if ordinal is None:
            continue
        meta = pod.get("metadata") or {}
        what = None
        if meta.get("deletionTimestamp"):
            what = "deleted"
        elif not _running(pod):
            what = container_failure(dict(pod)) or "not running"
        if what is not None:
            for rank in worker_env.pod_ranks(ordinal, ranks_per_pod):
                down[rank] = f"pod {meta.get('name', '')} {what}"
    return down


def _running(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return bool(statuses) and all("running" in (s.get("state") or {}) for s in statuses)


def room_problem(plan: Plan | None, live: Sequence[int], max_slots: int | None) -> str | None:
    """Why the live ranks cannot serve every expert of `plan` (None: they can)."""
    if plan is None or len(live) == plan.world_size:
        return None
    try:
        degraded_plan(plan, live, max_slots_per_rank=max_slots)
    except NoRoom as error:
        return str(error)
    except PlanError:
        return None  # rank 0 among the lost: the leader's loss, decided elsewhere
    return None


def rank_loss(
    group: GroupStatus | None,
    pods: Sequence[Mapping[str, Any]],
    ranks_per_pod: int,
) -> RankLoss | None:
    """What status says of a group serving without some of its ranks; None when it serves
    with all of them, or when the leader's pod failed (the group is replaced whole)."""
    if leader_failed(pods):
        return None
    down = down_ranks(pods, ranks_per_pod)
    lost = sorted(set(group.lost if group else ()) | set(down) - {0})
    joining = sorted(group.joining) if group else []
    if group is not None and group.state == REGROUPING and not lost:
        return None
    if not lost and not joining:
        return None
    epoch = f"epoch {group.epoch}, " if group else ""
    serving = f"{len(group.live)} of {group.world} ranks serve" if group else "the others serve"
    resumed = f", {group.resumed_requests} requests resumed so far" if group else ""
    if lost:
        whys = "; ".join(f"rank {r}: {down.get(r, 'dropped by the group')}" for r in lost[:4])
        more = "; ..." if len(lost) > 4 else ""
        return RankLoss(
            RANK_LOST, f"{whys}{more}; {serving} ({epoch}every expert served){resumed}", group
        )
    return RankLoss(
        REJOINING_REASON,
        f"ranks {joining} are back and get their experts from the others; {serving} "
        f"({epoch.rstrip(', ')})",
        group,
    )


def keeps_serving(
    group: GroupStatus | None,
    pods: Sequence[Mapping[str, Any]],
    plan: Plan | None,
    *,
    ranks_per_pod: int,
    max_slots: int | None,
) -> tuple[bool, str | None]:
    """(whether the group carries on without the ranks whose pods failed, and when it cannot
    for want of room, why)."""
    if group is None:
        return False, None
    down = down_ranks(pods, ranks_per_pod)
    world = plan.world_size if plan is not None else group.world
    if leader_failed(pods):
        # Replaced whole in any case; but a leader that stopped for want of room for another
        # pod's experts says so only in its own pod (status names why: the room).
        leaders = set(worker_env.pod_ranks(0, ranks_per_pod))
        others = [r for r in range(world) if r in down and r not in leaders]
        if not others:
            return False, None
        problem = room_problem(plan, [r for r in range(world) if r not in others], max_slots)
        return False, problem and f"no room for the lost ranks' experts: {problem}"
    live = [r for r in range(world) if r not in down and r not in group.lost]
    problem = room_problem(plan, live, max_slots)
    if problem is not None:
        return False, f"no room for the lost ranks' experts: {problem}"
    return True, None


def lost_report(
    pod: Mapping[str, Any], event: str, ranks_per_pod: int
) -> tuple[list[int], str] | None:
    """The ranks a pod event says are gone, and why: the pod deleted (or deleting), or its
    worker exited (terminated, or waiting to restart after it did); None for the leader's pod
    (its loss restarts the group whole), a pod starting, or one that runs. Not ready alone is
    no loss: a slow probe must not drop a live rank (its heartbeat decides)."""
    ordinal = pod_ordinal(pod)
    if ordinal is None or ordinal == 0:
        return None
    meta = pod.get("metadata") or {}
    name = meta.get("name", "")
    if event == "DELETED" or meta.get("deletionTimestamp"):
        why = f"pod {name} deleted"
    else:
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        if not any(_exited(status) for status in statuses):
            return None
        why = f"pod {name}: {container_failure(dict(pod)) or 'its worker exited'}"
    return list(worker_env.pod_ranks(ordinal, ranks_per_pod)), why


def _exited(status: Mapping[str, Any]) -> bool:
    """A container that ended: terminated, or waiting to restart after it did."""
    state = status.get("state") or {}
    restarting = "waiting" in state and (status.get("lastState") or {}).get("terminated")
    return "terminated" in state or bool(restarting)


def transition_events(
    previous: Mapping[str, Any], loss: RankLoss | None, group: GroupStatus | None
) -> list[tuple[str, str, str]]:
    """Events for the group's passage between serving whole, without ranks, and with ranks
    coming back (from the Degraded condition the previous status wrote)."""
    before = next(
        (c.get("reason") for c in previous.get("conditions") or [] if c.get("type") == "Degraded"
         and c.get("status") == "True"),
        None,
    )  # fmt: skip
    now = loss.reason if loss is not None else None
    if now == before:
        return []
    if loss is not None:
        kind = "Warning" if loss.reason == RANK_LOST else "Normal"
        return [(kind, loss.reason, loss.message)]
    if before in (RANK_LOST, REJOINING_REASON) and group is not None:
        return [
            ("Normal", "GroupWhole",
             f"every rank serves again (epoch {group.epoch}, {group.world} ranks)"),
        ]  # fmt: skip
    return []
