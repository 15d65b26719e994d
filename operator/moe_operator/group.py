"""The worker group updates as one: which pods to replace together, and what status says.

Pure. A torch.distributed process group cannot mix pod templates: ranks of an old revision and a
new one disagree on the shape, the rendezvous or the plan, so a rolling update (one pod at a time,
waiting for each to be ready) never finishes. The StatefulSet uses `updateStrategy: OnDelete`, and
the operator deletes every pod of an older revision at once when the template changes, as
LeaderWorkerSet does for its groups: one group restart per change, not one per pod.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REVISION_LABEL = "controller-revision-hash"


@dataclass(frozen=True)
class PodRef:
    """A pod to delete, with the uid precondition that spares a same-name successor."""

    name: str
    uid: str


@dataclass(frozen=True)
class GroupState:
    """Where the group stands against the StatefulSet's current template."""

    observed: bool  # the StatefulSet controller has seen the latest template
    update_revision: str
    stale: tuple[PodRef, ...]  # live pods of an older revision: delete them together
    terminating: int  # pods already going
    current: int  # live pods of the current revision

    @property
    def restarting(self) -> bool:
        """A group restart is under way: old pods still exist or are going."""
        return bool(self.stale) or self.terminating > 0

    @property
    def settled(self) -> bool:
        """Every live pod runs the latest template (plans may be handed to the leader)."""
        return self.observed and not self.restarting

    def message(self, world: int) -> str:
        if not self.observed:
            return "waiting for the StatefulSet controller to see the new pod template"
        if self.stale:
            return (
                f"replacing all {len(self.stale)} pods of the previous template at once "
                f"(revision {self.update_revision}); the group serves again when {world} are ready"
            )
        return (
            f"{self.terminating} pods of the previous template terminating, {self.current} of "
            f"{world} on revision {self.update_revision}"
        )


def group_state(statefulset: dict[str, Any], pods: Sequence[dict[str, Any]]) -> GroupState:
    """The group's state from the StatefulSet (its status' updateRevision) and its pods.

    Args:
        statefulset: the StatefulSet as stored (metadata.generation, status).
        pods: the StatefulSet's own pods (controller reference checked by the caller).
    """
    status = statefulset.get("status") or {}
    generation = (statefulset.get("metadata") or {}).get("generation", 0)
    observed = status.get("observedGeneration", 0) >= generation
    revision = status.get("updateRevision") or ""
    stale, terminating, current = [], 0, 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            terminating += 1
        elif observed and revision and (meta.get("labels") or {}).get(REVISION_LABEL) != revision:
            stale.append(PodRef(meta.get("name", ""), meta.get("uid", "")))
        else:
            current += 1
    return GroupState(observed, revision, tuple(stale), terminating, current)
