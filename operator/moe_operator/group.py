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

from moe_operator.failures import CONTAINER_NAME, STARTUP_EXIT_CODE

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


RECOVERING_REASON = "GroupRecovering"
"""The Degraded condition's reason while a group brought back after a failure forms again."""


BACKOFF_FIRST_S = 10.0
BACKOFF_MAX_S = 300.0
BACKOFF_RESET_S = 600.0


@dataclass(frozen=True)
class ReplacementBackoff:
    """Whole-group replacements in a row, and when the last ran (status.recovery).

    The pods of a replaced group start with no restart history, so the kubelet's own
    CrashLoopBackOff never grows for a group that keeps failing: without this the operator
    would recreate every pod each time, forever. As the kubelet does for one container: the
    first replacement runs at once, each further one in a row waits 10 s, 20 s, ... up to
    5 minutes after the previous; a failure 10 minutes or more after the last replacement
    starts the count over.
    """

    replacements: int = 0
    last_at: float | None = None  # seconds since the epoch

    @classmethod
    def from_status(cls, recovery: dict[str, Any] | None) -> ReplacementBackoff:
        recovery = recovery or {}
        last = recovery.get("lastReplacedAt")
        return cls(int(recovery.get("replacements") or 0), None if last is None else float(last))

    def in_a_row(self, now: float) -> int:
        """Replacements in a row as of `now` (0 once the last is old enough)."""
        if self.last_at is None or now - self.last_at >= BACKOFF_RESET_S:
            return 0
        return self.replacements

    def wait_s(self, now: float) -> float:
        """Seconds before the next whole-group replacement may run; 0: now."""
        done = self.in_a_row(now)
        if done == 0 or self.last_at is None:
            return 0.0
        delay = min(BACKOFF_FIRST_S * 2 ** (done - 1), BACKOFF_MAX_S)
        return max(0.0, self.last_at + delay - now)

    def replaced(self, now: float) -> ReplacementBackoff:
        return ReplacementBackoff(self.in_a_row(now) + 1, now)


@dataclass(frozen=True)
class GangFailure:
    """A rank of the group died or hung: every live pod is replaced at once.

    One process group cannot take a rank back: a restarted rank cannot rejoin the survivors'
    communicator, and they are stuck in (or failing) collectives with it. As LeaderWorkerSet's
    RecreateGroupOnRestart, the group restarts whole: new pods, a new rendezvous, the current
    plan from the ConfigMap.
    """

    pods: tuple[PodRef, ...]  # every live pod of the group
    failed: tuple[str, ...]  # "<pod>: <what happened>", one per failed pod

    def message(self, pods: int) -> str:
        return (
            f"{self._what()}: replacing all {len(self.pods)} pods at once (a rank cannot rejoin "
            f"a running group); the group serves again when {pods} are ready, with the current "
            "plan"
        )

    def held_message(self, in_a_row: int, wait_s: float) -> str:
        """While a backoff holds the replacement back."""
        return (
            f"{self._what()}: the group was replaced {in_a_row} times in a row; replacing all "
            f"{len(self.pods)} pods in {wait_s:.0f} s (backoff: 10 s doubling up to 5 min, reset "
            "after 10 min without a replacement)"
        )

    def _what(self) -> str:
        return f"{'; '.join(self.failed[:4])}{'; ...' if len(self.failed) > 4 else ''}"


def _container(pod: dict[str, Any]) -> dict[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((item for item in statuses if item.get("name") == CONTAINER_NAME), None)


def _last_line(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 3] + "..."


def container_failure(pod: dict[str, Any]) -> str | None:
    """What went wrong with the pod's worker since it started: it exited (a rank died, or the
    liveness probe killed it), or it restarted; None when it runs as first started, or when it
    refused its configuration (restarting the group cannot help: `failures` reports that)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = _container(pod)
    if status is None:
        return None
    terminated = (status.get("state") or {}).get("terminated")
    restarts = int(status.get("restartCount") or 0)
    if terminated is None and restarts == 0:
        return None
    terminated = terminated or (status.get("lastState") or {}).get("terminated") or {}
    if terminated.get("exitCode") == STARTUP_EXIT_CODE:
        return None
    what = f"exited with code {terminated['exitCode']}" if "exitCode" in terminated else "exited"
    if terminated.get("reason") and terminated["reason"] != "Error":
        what += f" ({terminated['reason']})"
    if restarts:
        what += f", restarted {restarts}x"
    detail = _last_line(terminated.get("message") or "")
    return what + (f": {detail}" if detail else "")


def gang_failure(pods: Sequence[dict[str, Any]]) -> GangFailure | None:
    """The pods to replace together when any worker of the group died or was restarted (a dead
    rank, a liveness failure of a hung one); None while every worker runs as first started."""
    failed = []
    for pod in pods:
        what = container_failure(pod)
        if what is not None:
            failed.append(f"{(pod.get('metadata') or {}).get('name', '')} {what}")
    if not failed:
        return None
    live = tuple(
        PodRef(meta.get("name", ""), meta.get("uid", ""))
        for meta in ((pod.get("metadata") or {}) for pod in pods)
        if not meta.get("deletionTimestamp")
    )
    return GangFailure(live, tuple(sorted(failed)))
