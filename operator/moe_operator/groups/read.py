"""One replica group as a run reads it: its StatefulSet and pods, and whether it is the spec's."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from moe_operator.groups.rollout import Drain


def ready_replicas(statefulset: dict[str, Any] | None) -> int:
    return int(((statefulset or {}).get("status") or {}).get("readyReplicas") or 0)


@dataclass
class GroupRead:
    """One group's StatefulSet and pods as read, and what the spec wants of it."""

    index: int
    statefulset: dict[str, Any]
    pods: list[dict[str, Any]]
    current: bool  # the StatefulSet is what the spec builds for this group
    drain: Drain | None = None

    @property
    def name(self) -> str:
        return str(self.statefulset["metadata"]["name"])

    @property
    def ready(self) -> int:
        return ready_replicas(self.statefulset)

    def serving(self, pods_wanted: int) -> bool:
        """Every pod of the group ready (its leader serves: the whole gang formed)."""
        live = [p for p in self.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        return self.ready >= pods_wanted and len(live) >= pods_wanted

    def serving_since(self) -> float | None:
        """When the last of its pods became ready (epoch s; the kubelet's Ready condition), or
        None when a pod does not say."""
        times = [_ready_since(p) for p in self.pods if not p["metadata"].get("deletionTimestamp")]
        if not times or None in times:
            return None
        return max(t for t in times if t is not None)

    def leader(self) -> dict[str, Any] | None:
        wanted = f"{self.name}-0"
        return next((p for p in self.pods if p["metadata"]["name"] == wanted), None)


def _ready_since(pod: dict[str, Any]) -> float | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            try:
                stamp = datetime.datetime.fromisoformat(condition["lastTransitionTime"])
            except (KeyError, TypeError, ValueError):
                return None
            return stamp.timestamp()
    return None
