"""One rank's part of each step's plan switch: what it does with the leader's `SwitchCommand`, the
same on every rank at the same step boundary, before the step's forward.

    start    stale (not newer than the plan served): answered at once, nothing moves; background:
             start moving experts (`switcher.BackgroundSwitcher`); blocking: move them now
             (`mover.ExpertMover.apply`) and meet every rank at a barrier: the serving pause
    poll     nothing to do: the rank's transfer state goes into its step result (`state`)
    flip     serve the plan whose experts landed (the pause is the flip)
    abandon  drop the switch in flight; the old plan keeps serving

A switch that ends gives a `SwitchAnswer` (the leader hands it to the HTTP thread waiting on the
switch); a switch applied is also reported to `on_switched` (the runtime's metrics) and logged.
No HTTP or metrics code here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from moe_contract.plan import Plan
from moe_contract.switch import BACKGROUND, BLOCKING, STALE, SwitchAnswer
from moe_worker.ep.comm import Comm
from moe_worker.serving.step import SwitchCommand
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.switcher import BackgroundSwitcher

log = logging.getLogger("moe_worker.switch")


@dataclass(frozen=True)
class Switched:
    """A switch this rank applied."""

    previous: int
    """The plan version served before."""
    plan: Plan
    moved: int
    """Experts this rank received."""
    pause_s: float
    transfer_s: float | None
    """Background: from posting the messages to the last one landed."""
    mode: str

    def answer(self) -> SwitchAnswer:
        return SwitchAnswer.switched(self.plan, self.pause_s, self.mode, self.transfer_s)


class RankSwitch:
    """The switch side of one rank's serving loop. Built collectively (every rank at the same
    point: the background switch forms its process group)."""

    def __init__(
        self,
        mover: ExpertMover,
        world_size: int,
        timeout_s: float,
        on_switched: Callable[[Switched], None] = lambda switched: None,
        comm: Comm | None = None,
    ) -> None:
        self.mover = mover
        self.background = BackgroundSwitcher(mover, world_size, timeout_s, comm)
        self.on_switched = on_switched

    def join_epoch(self, comm: Comm) -> Plan | None:
        """Collective: a new membership epoch (see `BackgroundSwitcher.join_epoch`)."""
        return self.background.join_epoch(comm)

    def state(self) -> str | None:
        """The background switch's state for the step result: None, pending, done, failed."""
        return self.background.state()

    def step(self, command: SwitchCommand) -> SwitchAnswer | None:
        """Carry out this step's command; the answer when the switch ended here."""
        previous = self.mover.engine.plan.version
        if command.action == "abandon":
            return self.background.abandon(command.reason or "")
        if command.action == "flip" and command.version is not None:
            plan, moved, pause, transfer_s = self.background.flip(command.version)
            return self._switched(Switched(previous, plan, moved, pause, transfer_s, BACKGROUND))
        if command.action == "start" and command.plan is not None:
            record, layout = command.plan, command.serve or command.plan
            # The same answer on every rank: nobody moves anything. The same version with a
            # layout is the group changing (a rank back), not a new plan.
            if record.version < previous or (record.version == previous and not command.serve):
                return SwitchAnswer.refused(STALE, version=previous)
            if command.background:
                self.background.start(layout, record)
                return None
            return self._switched(self._blocking(previous, layout, record))
        return None

    def _blocking(self, previous: int, layout: Plan, record: Plan) -> Switched:
        start = time.perf_counter()
        moved = self.mover.apply(layout, record)
        self.mover.engine.comm.barrier()
        return Switched(previous, record, moved, time.perf_counter() - start, None, BLOCKING)

    def _switched(self, switched: Switched) -> SwitchAnswer:
        self.on_switched(switched)
        # "switched plan A -> B" is what operators grep for (and the e2e suite reads).
        log.info(
            "rank %d switched plan %d -> %d (%s): received %d experts, serving pause %.4f s",
            self.mover.engine.rank,
            switched.previous,
            switched.plan.version,
            switched.mode,
            switched.moved,
            switched.pause_s,
        )
        return switched.answer()
