"""A plan switch that does not stop serving: one rank's side.

    step k      start(plan)    post this rank's expert messages on the transfer group (a
                               process group of its own), a watcher thread waits for them;
                               the old plan keeps serving
    steps k+1.. state()        pending / done / failed, reported to the leader in each result
                               (a rank whose memory cannot hold the plan fails here, before
                               posting anything: the switch is abandoned as "does not fit")
    step m      flip(version)  every rank reported done: copy the staging buffers into the
                               stacked slots and serve the new plan (the serving pause)
             or abandon(why)   a rank failed or the switch timed out: drop it, the old plan
                               keeps serving, the leader answers the operator with the reason

The leader (`serving.leader.Leader`) decides flip or abandon from every rank's state, so all ranks
do the same at the same step boundary (`commands.RankSwitch`): never half-switched. A rank that
dies mid-transfer ends the membership epoch: every survivor drops the switch in flight with the
epoch's transfer group (`join_epoch`), and the leader answers it (the old plan serves, degraded).

An abandoned switch may leave messages unmatched on the transfer group, so every rank drops
that group and forms a new one (collective, at the abandon step); what those messages may still
touch is kept alive until the process ends (a rare failure; freeing a buffer a late message could
write into is not safe).

No HTTP or metrics code here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from moe_contract.plan import Plan
from moe_contract.switch import DOES_NOT_FIT, TIMEOUT, TRANSFER_FAILED, SwitchAnswer
from moe_worker.ep.comm import Comm
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.transfer import DONE, FAILED, ExpertTransfer, new_transfer_group

log = logging.getLogger("moe_worker.switch.switcher")


class BackgroundSwitcher:
    """The background plan switch of one rank's engine."""

    def __init__(
        self, mover: ExpertMover, world_size: int, timeout_s: float, comm: Comm | None = None
    ) -> None:
        self.mover, self.engine, self.timeout_s = mover, mover.engine, timeout_s
        self.comm = comm
        # Collective at start-up (every rank builds its switcher at the same point).
        self.group = new_transfer_group(timeout_s, comm) if world_size > 1 else None
        self.plan: Plan | None = None
        """The layout the switch in flight serves at its flip."""
        self.record: Plan | None = None
        """The operator's plan it is the layout of (itself unless ranks are absent)."""
        self.transfer: ExpertTransfer | None = None
        self.error: str | None = None
        self._abandoned: list[Any] = []

    def start(self, plan: Plan, record: Plan | None = None) -> None:
        """Post the messages that bring this rank `plan`'s new experts (`plan`: the layout of
        the operator's `record`); never raises (a local failure is reported as the state, and
        the leader abandons the switch)."""
        self.plan, self.record, self.transfer, self.error = plan, record or plan, None, None
        try:
            self.transfer = self.mover.start(plan, self.group)
            self.transfer.watch()
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            log.error(
                "rank %d could not start switching to plan %d: %s",
                self.engine.rank,
                plan.version,
                self.error,
            )

    def state(self) -> str | None:
        """None (no switch in flight), `pending`, `done` or `failed: <why>`."""
        if self.plan is None:
            return None
        if self.error is not None:
            return f"{FAILED}: {self.error}"
        assert self.transfer is not None
        status = self.transfer.status()
        return f"{FAILED}: {status.error}" if status.state == FAILED else status.state

    def flip(self, version: int) -> tuple[Plan, int, float, float | None]:
        """Serve the plan whose experts landed: (plan, experts received, pause s, transfer s)."""
        plan, transfer = self.plan, self.transfer
        if plan is None or transfer is None or plan.version != version:
            raise RuntimeError(f"flip to plan {version}, but no such switch is in flight here")
        status = transfer.status()
        if status.state != DONE:  # the leader flips only after every rank reported done
            raise RuntimeError(f"flip to plan {version} with this rank's transfer {status.state}")
        start = time.perf_counter()
        record = self.record or plan
        moved = self.mover.flip(plan, transfer, record)
        pause = time.perf_counter() - start
        self.plan = self.record = self.transfer = None
        return record, moved, pause, status.seconds

    def abandon(self, reason: str) -> SwitchAnswer:
        """Collective: drop the switch in flight (maybe none on this rank); the answer."""
        version = None if self.plan is None else self.plan.version
        log.warning("rank %d abandons the switch to plan %s: %s", self.engine.rank, version, reason)
        if self.transfer is not None:
            self._abandoned.append(self.transfer.buffers())
        if self.group is not None:
            self._abandoned.append(self.group)
            (self.comm or Comm.world()).drop_subgroup(self.group)
            self.group = new_transfer_group(self.timeout_s, self.comm)
        self.plan = self.record = self.transfer = self.error = None
        # A rank that refused the plan before moving anything (`ExpertMover.check_memory`): the
        # plan itself is at fault, not the transfer, and sending it again will not help.
        refused = f"{FAILED}: PlanError" in reason
        why = TIMEOUT if reason.startswith("timeout") else DOES_NOT_FIT if refused else None
        return SwitchAnswer.refused(
            why or TRANSFER_FAILED, version=self.engine.plan.version, error=reason
        )

    def join_epoch(self, comm: Comm) -> Plan | None:
        """Collective (every member of the new epoch, same point): a new membership epoch. The
        switch in flight, if any, is dropped with the old epoch's transfer group (its messages
        may still land: their buffers are kept); a new transfer group forms. Returns the record
        plan of the dropped switch (None: there was none)."""
        dropped = self.record
        if self.transfer is not None:
            self._abandoned.append(self.transfer.buffers())
        if self.group is not None:
            self._abandoned.append(self.group)
        self.plan = self.record = self.transfer = self.error = None
        self.comm = comm
        self.group = new_transfer_group(self.timeout_s, comm) if comm.size > 1 else None
        return dropped

    def ready_to_flip(self, version: int) -> bool:
        """Whether a switch to `version` is in flight here with every expert landed."""
        if self.plan is None or self.transfer is None or self.plan.version != version:
            return False
        return self.transfer.status().state == DONE
