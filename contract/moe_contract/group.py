"""The group's membership as a worker reports it (GET /v1/group), and the news the operator gives
the leader about its pods (POST /v1/group/lost). Part of the operator -> worker contract.

    GET /v1/group (every rank: its own view; the leader's is the group's)
      200 {"epoch", "world", "liveRanks": [...], "lostRanks": [...], "joiningRanks": [...],
           "state": "Serving" | "Degraded" | "Rejoining" | "Regrouping", "reason",
           "resumedRequests"}
      404 the group has no membership of its own (every rank's loss restarts it whole)
    POST /v1/group/lost (leader, the control token) {"ranks": [...], "reason": "..."}
      202 {"accepted": true}: those members are dropped at once (no heartbeat timeout)

Imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SERVING, DEGRADED, REJOINING, REGROUPING = "Serving", "Degraded", "Rejoining", "Regrouping"


@dataclass(frozen=True)
class GroupStatus:
    epoch: int
    world: int
    """Ranks of the full group."""
    live: tuple[int, ...]
    """Ranks in the current epoch (the leader among them)."""
    joining: tuple[int, ...] = ()
    """Live ranks whose experts are still on their way (they hold no slot yet)."""
    state: str = SERVING
    reason: str | None = None
    """Why the group is regrouping now (None otherwise)."""
    resumed_requests: int = 0
    """Requests resumed on another rank after theirs was lost (the leader's count)."""

    @property
    def lost(self) -> tuple[int, ...]:
        return tuple(rank for rank in range(self.world) if rank not in self.live)

    def to_document(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "world": self.world,
            "liveRanks": list(self.live),
            "lostRanks": list(self.lost),
            "joiningRanks": list(self.joining),
            "state": self.state,
            "reason": self.reason,
            "resumedRequests": self.resumed_requests,
        }

    @classmethod
    def from_document(cls, raw: Mapping[str, Any]) -> GroupStatus | None:
        """A worker's answer read leniently: None when it is not one."""
        try:
            return cls(
                epoch=int(raw["epoch"]),
                world=int(raw["world"]),
                live=tuple(int(r) for r in raw["liveRanks"]),
                joining=tuple(int(r) for r in raw.get("joiningRanks") or ()),
                state=str(raw.get("state") or SERVING),
                reason=raw.get("reason"),
                resumed_requests=int(raw.get("resumedRequests") or 0),
            )
        except (KeyError, TypeError, ValueError):
            return None


def lost_document(ranks: Sequence[int], reason: str) -> dict[str, Any]:
    """The body of POST /v1/group/lost."""
    return {"ranks": list(ranks), "reason": reason}
