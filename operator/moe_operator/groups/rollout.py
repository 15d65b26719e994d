"""Which replica groups to start, drain, remove or restart in one run: one pure decision.

As LeaderWorkerSet's rolling update, counted in groups (`spec.updateStrategy`):

- A group is *current* when its StatefulSet carries the spec's pod template, *old* otherwise.
  Fewer current groups than `replicas`: start new ones (the lowest free numbers), as long as all
  groups together stay within `replicas + maxSurge`.
- More groups than `replicas` (old ones beside their successors, or a scale-in): drain one, old
  ones first, then those that do not serve, then the highest number, but only while the groups
  that serve stay at least `replicas - maxUnavailable`: with the default surge 1 and unavailable
  0 an old group goes only once its successor serves, and has served for `ROUTABLE_S` (the
  router must have found it first: with one group, nothing else takes the traffic meanwhile).
- With no room to start one (maxSurge 0), an old group is drained and then restarted in place.
- One group drains at a time. Draining: its leader leaves the router (a label), requests in
  flight finish; it is done once its leader has had none for a few seconds after the router let
  go of it, or at the pods' termination grace period, or at once when it serves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Purpose = Literal["remove", "restart"]
DRAIN_SETTLE_S = 5.0
"""A drained leader may still get requests the router sent before it let go (smg coalesces pod
events for a second, then removes the worker): a drain lasts at least this long."""
ROUTABLE_S = 5.0
"""A group counts toward the serving floor this long after its whole gang became ready: smg
finds a ready leader by its pod watch, then activates it after a health check (every 2 s).
Without it, one group's template change drained the old leader in the same second its
successor became ready, and smg answered 503 "no available workers" for about a second."""


@dataclass(frozen=True)
class Drain:
    """A group on its way out (or to a restart in place), since `since` (epoch seconds)."""

    purpose: Purpose
    since: float

    def annotation(self) -> str:
        return f"{self.purpose} {self.since!r}"

    @classmethod
    def parse(cls, text: str | None) -> Drain | None:
        """The drain an annotation records; None when absent or unreadable (not draining)."""
        purpose, _, since = (text or "").partition(" ")
        if purpose not in ("remove", "restart"):
            return None
        try:
            return cls("remove" if purpose == "remove" else "restart", float(since))
        except ValueError:
            return None


@dataclass(frozen=True)
class Group:
    """One group as this run reads it."""

    index: int
    current: bool  # its StatefulSet carries the spec's pod template
    serving: bool  # every pod ready on its template: the whole gang serves
    drain: Drain | None = None
    in_flight: int | None = None  # requests waiting or running on its leader; None: unknown
    serving_since: float | None = None  # its whole gang ready since (epoch s); None: unknown

    def routable(self, policy: Policy, now: float) -> bool:
        """Serving long enough for the router to have found it (unknown since: at once)."""
        since = self.serving_since
        return self.serving and (since is None or now - since >= policy.routable_s)


@dataclass(frozen=True)
class Policy:
    replicas: int
    max_surge: int = 1
    max_unavailable: int = 0
    drain_timeout_s: float = 30.0  # the pods' terminationGracePeriodSeconds
    settle_s: float = DRAIN_SETTLE_S
    routable_s: float = ROUTABLE_S


@dataclass(frozen=True)
class Rollout:
    """What to do this run, and what the rollout waits for (for status; empty: nothing)."""

    create: tuple[int, ...] = ()  # start these groups on the spec's template
    drain: tuple[tuple[int, Purpose], ...] = ()  # start draining these
    remove: tuple[int, ...] = ()  # drained: delete these groups
    restart: tuple[int, ...] = ()  # drained: restart these in place on the spec's template
    waiting: str = ""

    @property
    def busy(self) -> bool:
        return bool(self.create or self.drain or self.remove or self.restart or self.waiting)


def drained(group: Group, policy: Policy, now: float, others_serve: bool = True) -> bool:
    """Whether a draining group may go: it serves nothing, or its leader has had nothing in
    flight since the router let go (at once when no other group serves: the router has
    nowhere else to send), or the grace period is over."""
    if group.drain is None:
        return False
    elapsed = now - group.drain.since
    if not group.serving or elapsed >= policy.drain_timeout_s:
        return True
    settle = policy.settle_s if others_serve else 0.0
    return elapsed >= settle and group.in_flight == 0


def _free(groups: Sequence[Group], count: int, taken: frozenset[int]) -> tuple[int, ...]:
    taken = taken | {group.index for group in groups}
    free = (index for index in range(len(taken) + count + 1) if index not in taken)
    return tuple(next(free) for _ in range(count))


def _out_first(group: Group) -> tuple[bool, bool, int]:
    """Sort key: the group to take out first sorts first (old, not serving, highest number)."""
    return (group.current, group.serving, -group.index)


def decide_rollout(
    groups: Sequence[Group], policy: Policy, now: float, taken: frozenset[int] = frozenset()
) -> Rollout:
    """The rollout's actions for this run (see the module docstring for the rules). `taken`:
    numbers not to give a new group (a removed group's pods still terminating)."""
    finishing = [
        g
        for g in groups
        if g.drain is not None
        and drained(g, policy, now, any(o.serving and o.drain is None for o in groups))
    ]
    remove = tuple(g.index for g in finishing if g.drain and g.drain.purpose == "remove")
    restart = tuple(g.index for g in finishing if g.drain and g.drain.purpose == "restart")
    draining = [g for g in groups if g.drain is not None and g not in finishing]
    active = [g for g in groups if g.drain is None]
    current = [g for g in active if g.current]
    old = [g for g in active if not g.current]
    # Groups that go this run free their place; restarted ones keep it (and come back current).
    present = len(groups) - len(remove)
    room = policy.replicas + policy.max_surge - present
    missing = policy.replicas - len(current) - len(restart)
    create = _free(groups, max(0, min(missing, room)), taken)
    serving = sum(1 for g in active if g.serving)
    floor = policy.replicas - policy.max_unavailable
    drain: tuple[tuple[int, Purpose], ...] = ()
    waiting = ""
    if not draining and not finishing:
        excess = len(active) - policy.replicas
        candidates = sorted(old if old else current, key=_out_first) if excess > 0 else []
        purpose: Purpose = "remove"
        if not candidates and old and not create and room <= 0:
            candidates, purpose = sorted(old, key=_out_first), "restart"
        if candidates:
            out = candidates[0]
            others = [g for g in active if g is not out and g.serving]
            routable = sum(1 for g in others if g.routable(policy, now))
            if not out.serving or routable >= floor:
                drain = ((out.index, purpose),)
            elif len(others) >= floor:
                waiting = f"group {out.index} stays until the router has found its successor"
            else:
                waiting = (
                    f"group {out.index} stays until another group serves "
                    f"({serving} of {policy.replicas} serve; maxUnavailable "
                    f"{policy.max_unavailable})"
                )
    elif draining:
        waiting = f"group {draining[0].index} drains"
    if not waiting and (create or old):
        waiting = f"{len(old)} group(s) on an older template; {len(current)} current"
    return Rollout(create, drain, remove, restart, waiting)
