"""Who is in the group: membership epochs and the leader's verdict on a member's liveness. Pure
(no torch, no store, no clock of its own): the runtime keeps the records in the rendezvous store
and feeds the verdict what its threads read there (`runtime.membership`).

An epoch is a set of members, each a plan rank and the incarnation of the process serving it
(a rank restarted is a new incarnation: a process stopped, dropped and then continued finds
another incarnation, or none, in its place, and leaves). Epoch numbers only grow; the leader
(rank 0, which also serves the store) writes every record, then the current number.

Liveness is judged by heartbeats, never by how long a collective takes (a long step on a slow
CPU is no failure): every member counts a beat in the store every `BEAT_S`; a member whose count
has not moved for `hang_s` is lost, and once a collective of the epoch failed (a peer's
connection closed: gloo says so at once, not who), for `suspect_s`. Beats of a member that
counted none yet are timed from when the epoch began.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BEAT_S = 0.2
"""How often every member counts a beat (and reads the epoch number)."""
SUSPECT_S = 1.5
"""Once a collective failed: a member silent for this long is lost."""


@dataclass(frozen=True)
class Member:
    rank: int
    incarnation: str


@dataclass(frozen=True)
class EpochRecord:
    """One membership epoch as the leader wrote it."""

    epoch: int
    members: tuple[Member, ...]
    lost: tuple[int, ...] = ()
    """Ranks that left at this epoch."""
    joined: tuple[int, ...] = ()
    """Ranks that came (back) at this epoch."""
    reason: str = ""

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(member.rank for member in self.members)

    def member(self, rank: int) -> Member | None:
        return next((m for m in self.members if m.rank == rank), None)

    def holds(self, rank: int, incarnation: str) -> bool:
        """Whether this process (rank, incarnation) is a member."""
        return Member(rank, incarnation) in self.members

    def next(self, lost: Iterable[int], joined: Iterable[Member], reason: str) -> EpochRecord:
        """The epoch after this one: `lost` ranks out, `joined` members in (rank order)."""
        gone = set(lost)
        new = {m.rank: m for m in joined}
        members = [m for m in self.members if m.rank not in gone and m.rank not in new]
        members = sorted([*members, *new.values()], key=lambda m: m.rank)
        return EpochRecord(
            self.epoch + 1,
            tuple(members),
            tuple(sorted(gone & set(self.ranks))),
            tuple(sorted(new)),
            reason,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "members": [[m.rank, m.incarnation] for m in self.members],
                "lost": self.lost,
                "joined": self.joined,
                "reason": self.reason,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> EpochRecord:
        raw = json.loads(text)
        return cls(
            int(raw["epoch"]),
            tuple(Member(int(rank), str(inc)) for rank, inc in raw["members"]),
            tuple(raw.get("lost", ())),
            tuple(raw.get("joined", ())),
            str(raw.get("reason", "")),
        )


@dataclass
class _Seen:
    count: int
    since: float
    """When `count` was first read (the leader's monotonic clock)."""


@dataclass
class Liveness:
    """The leader's verdict: which members of the epoch are lost, from their beat counts."""

    hang_s: float
    suspect_s: float = SUSPECT_S
    _seen: dict[int, _Seen] = field(default_factory=dict)
    _suspected_at: float | None = None
    _reported: dict[int, str] = field(default_factory=dict)

    def begin(self, members: Sequence[int], now: float) -> None:
        """A new epoch of `members`: every member's silence is timed from now."""
        self._seen = {rank: _Seen(-1, now) for rank in members}
        self._suspected_at = None
        self._reported = {r: why for r, why in self._reported.items() if r in self._seen}

    def beat(self, rank: int, count: int, now: float) -> None:
        seen = self._seen.get(rank)
        if seen is not None and count != seen.count:
            self._seen[rank] = _Seen(count, now)

    def suspect(self, now: float) -> None:
        """A collective of the epoch failed: a member silent for `suspect_s` is lost."""
        if self._suspected_at is None:
            self._suspected_at = now

    @property
    def suspected(self) -> bool:
        return self._suspected_at is not None

    def suspicion_cleared(self, now: float) -> bool:
        """Suspected long enough that every member had time to beat, and none is lost: the
        failure was the group's connections, not a member (form the group again, as it is)."""
        if self._suspected_at is None:
            return False
        return now - self._suspected_at > self.suspect_s + BEAT_S and not self.lost(now)

    def report(self, rank: int, why: str) -> None:
        """Someone who knows (the operator: the pod was deleted, or its container exited) says
        `rank` is lost."""
        if rank in self._seen:
            self._reported[rank] = why

    def lost(self, now: float) -> dict[int, str]:
        """Members lost as of `now`, each with why."""
        lost = dict(self._reported)
        for rank, seen in self._seen.items():
            silent = now - seen.since
            if rank in lost:
                continue
            if silent > self.hang_s:
                lost[rank] = f"no heartbeat for {silent:.1f} s (stopped or hung)"
            elif self._suspected_at is not None and silent > self.suspect_s:
                lost[rank] = f"no heartbeat for {silent:.1f} s after a collective failed"
        return dict(sorted(lost.items()))
