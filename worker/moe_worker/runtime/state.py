"""One rank's state as its threads share it: the serving loop writes it, the HTTP threads and
metric scrapes read it. Single attribute writes, never a lock the loop holds while computing."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from moe_contract.group import DEGRADED, REGROUPING, REJOINING, SERVING
from moe_contract.plan import Plan
from moe_worker.ep.comm import Comm
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.switch.commands import RankSwitch

LEADER_READY_STALL_S = 10.0
"""The leader steps at least every `leader.IDLE_TICK` (0.2 s) while the group serves; this long
without a step, a peer hangs or is gone and the group serves nothing: the leader reports not
ready (its pod leaves the `-api` Service) well before liveness (`stall_timeout`) restarts it."""


@dataclass(frozen=True)
class GroupView:
    """The group as this rank last regrouped: what GET /v1/group answers."""

    epoch: int
    world: int
    members: tuple[int, ...]
    holders: tuple[int, ...]
    """Members holding slots (a rank that joined holds none until its experts arrive)."""
    regrouping: str | None = None
    """Why the group is forming again right now (None: it serves)."""

    @property
    def state(self) -> str:
        """Serving (every rank), Degraded (ranks lost), Rejoining (a rank back, its experts on
        the way), or Regrouping (between two epochs)."""
        if self.regrouping is not None:
            return REGROUPING
        if len(self.holders) == self.world:
            return SERVING
        return REJOINING if len(self.members) > len(self.holders) else DEGRADED


class RankState:
    def __init__(self) -> None:
        self.engine: EPEngine | None = None
        self.runner: ModelRunner | None = None
        self.switch: RankSwitch | None = None
        """Set one by one while the rank loads (the engine first: its plan is readable then)."""
        self.serving = False
        """The group formed and loaded its plan, and the loop steps: ready, and a stall counts
        (forming the group and loading weights do not)."""
        self.last_step = time.monotonic()
        self.stopping = threading.Event()
        """Asked to stop (a signal, or the process ending)."""
        self.draining = threading.Event()
        """Asked to drain (SIGTERM, POST /v1/drain): not ready, nothing new admitted, running
        sequences finish."""
        self.stopped = threading.Event()
        """The serving loop ended."""
        self.group: GroupView | None = None
        """Set when the group runs its own membership (survives a member)."""
        self.on_group_change = lambda view: None

    def group_changed(self, comm: Comm | None, engine: EPEngine) -> None:
        """The group serves (again) in `comm`'s epoch."""
        if comm is None:
            return
        present = engine.plan.present
        view = GroupView(
            comm.epoch,
            engine.plan.world_size,
            comm.members,
            tuple(r for r in comm.members if r in present),
        )
        self.group = view
        self.on_group_change(view)

    def holders_changed(self, engine: EPEngine) -> None:
        """A switch moved experts: the members holding slots may have changed (a rank back)."""
        view = self.group
        if view is not None:
            present = engine.plan.present
            holders = tuple(r for r in view.members if r in present)
            self.group = GroupView(view.epoch, view.world, view.members, holders)
            self.on_group_change(self.group)

    def regrouping(self, why: str) -> None:
        """The group forms again (a member lost or joining)."""
        if self.group is not None:
            self.group = GroupView(
                self.group.epoch, self.group.world, self.group.members, self.group.holders, why
            )

    def stepped(self) -> None:
        self.last_step = time.monotonic()

    def plan(self) -> Plan | None:
        """The operator's plan being served (over the ranks in the group); None before the
        engine is built."""
        engine = self.engine
        return None if engine is None else engine.record

    def is_ready(self, *, leader: bool) -> bool:
        """Every rank: the group formed and loaded its plan. The leader also: the group keeps
        stepping, so a ready leader means the whole group serves."""
        stalled = time.monotonic() - self.last_step > LEADER_READY_STALL_S
        stopping = self.stopping.is_set() or self.draining.is_set()
        return self.serving and not stopping and not (leader and stalled)

    def is_live(self, stall_timeout: float) -> bool:
        """False once the loop made no step for `stall_timeout` seconds while serving."""
        stalled = time.monotonic() - self.last_step > stall_timeout
        return not (self.serving and stalled)
