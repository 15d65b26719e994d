"""Why the workers refuse to start: the termination messages they leave in their pods' status.

Pure. A worker that cannot serve what the spec says (a checkpoint whose config.json disagrees
with the model, a checkpoint directory that is not there, a KV budget below one block) stops at
start-up with `STARTUP_EXIT_CODE` and writes why to its termination message file; the kubelet
copies it into the pod's status (`containerStatuses[].state.terminated.message`, then
`lastState.terminated.message` while it waits to restart). Restarting cannot help: it fails the
same way until the spec or the checkpoint changes, so status says so, naming both values, and
the refusal is held (`status.refusal`, with the spec generation it was seen at): the group is
scaled to zero instead of crash-looping, until the spec changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_contract.env import rank_from_pod_name

STARTUP_EXIT_CODE = 2
"""`moe_worker.process.EXIT_CONFIG`: the worker refused its configuration (a contract test keeps
the two equal)."""
SHAPE_MISMATCH = "the checkpoint does not match the model shape"
"""How `moe_worker.models.checkpoint.ShapeMismatch` starts its list of disagreeing fields."""
CHECKPOINT_INVALID = "the checkpoint is invalid"
"""How `moe_worker.models.verify.CheckpointInvalid` starts: a damaged file, named."""
CONTAINER_NAME = "worker"
MESSAGE_LIMIT = 1024  # a condition is read by people; the pod keeps the whole message


@dataclass(frozen=True)
class StartupFailure:
    """Workers of the group that stopped at start-up, and the first one's reason."""

    reason: str  # CheckpointMismatch | CheckpointInvalid | WorkerStartupFailed
    message: str  # the lowest rank's termination message
    pods: tuple[str, ...]

    def describe(self, world: int) -> str:
        fix = FIXES.get(self.reason, FIXES["WorkerStartupFailed"])
        return (
            f"{len(self.pods)} of {world} workers refused to start ({', '.join(self.pods[:4])}"
            f"{', ...' if len(self.pods) > 4 else ''}): {self.message}; {fix}; {HELD}"
        )

    def record(self, generation: int) -> dict[str, Any]:
        """status.refusal: the refusal held for the spec generation it was seen at."""
        pods = list(self.pods)
        return {
            "generation": generation,
            "reason": self.reason,
            "message": self.message,
            "pods": pods,
        }

    @classmethod
    def held(cls, record: Any, generation: int) -> StartupFailure | None:
        """The refusal status holds for this generation; None when there is none, it was seen
        at another generation (the spec changed: try again), or it is not one (edited)."""
        if not isinstance(record, dict) or record.get("generation") != generation:
            return None
        reason, message, pods = record.get("reason"), record.get("message"), record.get("pods")
        if not isinstance(reason, str) or not isinstance(message, str):
            return None
        return cls(reason, message, tuple(str(pod) for pod in pods or ()))


FIXES = {
    "CheckpointMismatch": "make spec.model agree with the checkpoint's config.json, or point "
    "spec.model.source at the checkpoint that fits",
    "CheckpointInvalid": "repair or replace the file named on the volume",
    "WorkerStartupFailed": "fix the spec or the checkpoint; the workers refuse it the same way "
    "on restart",
}
HELD = "the workers stay stopped (0 pods) until the spec changes"


def _container_status(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((item for item in statuses if item.get("name") == container), None)


def refused(pod: dict[str, Any], container: str = CONTAINER_NAME) -> str | None:
    """The termination message of a worker that stopped at start-up and is not running again;
    None for a pod that runs, is going away, or stopped for another reason."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = _container_status(pod, container)
    if status is None or "running" in (status.get("state") or {}):
        return None  # a failure before this run is history
    terminated = (status.get("state") or {}).get("terminated") or (
        status.get("lastState") or {}
    ).get("terminated")
    if not terminated or terminated.get("exitCode") != STARTUP_EXIT_CODE:
        return None
    message = (terminated.get("message") or "").strip()
    return message or "it exited with code 2 (a start-up refusal); its log says why"


def startup_failure(pods: Sequence[dict[str, Any]]) -> StartupFailure | None:
    """The group's start-up refusals, lowest rank first; None when no worker refused."""
    failing = []
    for pod in pods:
        message = refused(pod)
        if message is not None:
            name = str((pod.get("metadata") or {}).get("name") or "")
            failing.append((rank_from_pod_name(name) or 0, name, message))
    if not failing:
        return None
    failing.sort()
    message = failing[0][2]
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
    reason = (
        "CheckpointMismatch"
        if SHAPE_MISMATCH in message
        else "CheckpointInvalid"
        if CHECKPOINT_INVALID in message
        else "WorkerStartupFailed"
    )
    return StartupFailure(reason, message, tuple(name for _, name, _ in failing))
