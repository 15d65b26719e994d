"""A rank regrouping: from the end of one membership epoch to serving in the next.

1. next epoch   the leader writes it (members lost out: its monitor's verdict; ranks asking
                to join in), the others follow; together they form its process group
                (`Membership.next_epoch`). A process no longer in it leaves (`Dropped`).
2. regroup      the leader broadcasts a `serving.regroup.Regroup`: the last step committed
                (a later one begun is undone: `ModelRunner.rewind`, `Scheduler.rewind`),
                the plan and layout served (a rank joining takes them; any other member
                must serve exactly them), and the layout without the lost members
                (`moe_contract.elastic.degraded_plan`: their orphaned experts read from the
                weights by the survivors that take them). The switch in flight is dropped
                and answered; the lost members' requests resume on the others.
3. agree        every member answers; all go on, or all stop (a flip half done, no room for
                the orphans: the group restarts whole, and the leader says why).
4. move         every member installs the new layout (collective, blocking: the re-formation
                is the only pause) and serves on.
5. grow         members holding no slot (ranks that joined) get their experts from the
                holders by the group's own background switch (`Leader.grow`), while the
                others serve; the flip puts the group back on the full layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from moe_contract.elastic import degraded_plan
from moe_contract.plan import Plan, PlanError
from moe_worker.ep import group
from moe_worker.ep.comm import Comm
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.metrics import WorkerMetrics
from moe_worker.runtime.membership import Changes, Membership
from moe_worker.runtime.state import RankState
from moe_worker.serving.leader import Leader
from moe_worker.serving.regroup import Regroup, RegroupAnswer
from moe_worker.switch.commands import RankSwitch

log = logging.getLogger("moe_worker.runtime.regroup")


GROW_RETRY_S = 2.0
"""After a switch that was to bring a rank back its experts failed, try again this much later."""


class ServingLoop(Protocol):
    """What a regroup changes of the serving loop (`runtime.loop.ServingLoop`)."""

    engine: EPEngine
    runner: ModelRunner
    switch: RankSwitch
    leader: Leader | None
    state: RankState
    metrics: WorkerMetrics
    comm: Comm | None
    step: int
    committed: int


class GroupCannotGoOn(RuntimeError):
    """The survivors cannot serve together (no room for the orphaned experts, a flip half done):
    the group restarts whole; the message says why."""


class Regrouper:
    def __init__(
        self,
        loop: ServingLoop,
        membership: Membership,
        max_slots_per_rank: int | None,
        switch_timeout: float,
    ) -> None:
        self.loop, self.membership = loop, membership
        self.max_slots_per_rank, self.switch_timeout = max_slots_per_rank, switch_timeout
        comm = membership.comm
        self.members: tuple[int, ...] = comm.members if comm is not None else ()
        """The members of the last epoch this rank served in."""
        self._grown_at = 0.0

    def regroup(self, why: str, changes: Changes | None = None) -> None:
        """Steps 1-5 after the epoch ended (`why`); `changes`: the leader's planned ones."""
        m = self.membership
        log.warning("rank %d leaves epoch %d: %s", m.rank, m.epoch, why)
        self.loop.state.regrouping(why)
        if not m.is_leader and changes is None:
            m.failed()
        self.loop.comm = m.next_epoch(changes)
        self.sync()

    def sync(self) -> None:
        """Steps 2-5 on the epoch just formed (also a joining rank's first steps)."""
        loop, m = self.loop, self.membership
        comm = loop.comm
        assert comm is not None
        text = self._decide(comm).to_json() if m.is_leader else None
        regroup = Regroup.from_json(group.broadcast_text(text, comm))
        problem = self._adopt(regroup, comm)
        answers = group.gather_text(RegroupAnswer(m.rank, problem).to_json(), comm)
        problems = [a.problem for a in map(RegroupAnswer.from_json, answers) if a.problem]
        if problems:
            raise GroupCannotGoOn("; ".join(problems))
        if regroup.serve is not None:
            moved = loop.switch.mover.apply(regroup.serve, regroup.record)
            comm.barrier()
            log.info(
                "rank %d serves plan %d without ranks %s: %d experts read or received",
                m.rank, regroup.record.version, list(regroup.serve.absent_ranks or ()), moved,
            )  # fmt: skip
        self.members = comm.members
        loop.state.group_changed(comm, loop.engine)
        if m.is_leader:
            self._after(comm)
        log.info("rank %d serves in epoch %d with ranks %s", m.rank, comm.epoch, list(comm.members))

    def switched(self) -> None:
        """Leader: a switch ended; a rank joining may now hold its experts."""
        engine = self.loop.engine
        self.membership.publish_served(engine.record, engine.plan)
        self.loop.state.group_changed(self.loop.comm, engine)

    # ------------------------------------------------------------ the leader

    def _decide(self, comm: Comm) -> Regroup:
        loop, engine, leader = self.loop, self.loop.engine, self.loop.leader
        assert leader is not None
        lost = tuple(r for r in self.members if r not in comm.members)
        joined = tuple(r for r in comm.members if r not in self.members)
        holders = tuple(r for r in engine.plan.present if r in comm.members)
        serve = None
        if holders != engine.plan.present:
            try:
                serve = degraded_plan(
                    engine.plan, holders, max_slots_per_rank=self.max_slots_per_rank
                )
            except PlanError as error:  # no room for the orphans: the group restarts whole
                raise GroupCannotGoOn(
                    f"no room for the experts of ranks {list(lost)}: {error}"
                ) from None
        reason = "; ".join(f"rank {r} was lost" for r in lost) or "the group changed"
        resumed = leader.regroup(lost, joined, f"{reason} during the switch; the old plan serves")
        loop.metrics.requests_resumed.inc(len(resumed))
        if resumed:
            log.warning("resuming %d requests of ranks %s on the others", len(resumed), list(lost))
        return Regroup(comm.epoch, loop.committed, engine.record, engine.plan, serve, lost, joined)

    def _after(self, comm: Comm) -> None:
        """Leader: publish what is served; bring members that hold nothing their experts."""
        engine, leader = self.loop.engine, self.loop.leader
        assert leader is not None
        self.membership.publish_served(engine.record, engine.plan)
        leader.layout = self._layout(comm)
        self._grown_at = 0.0
        self.grow_back()

    def grow_back(self) -> None:
        """Leader, no switch in flight: members that hold no slot (ranks back in the group) get
        their experts by a background switch to the layout over every member (tried again a
        while after one that failed)."""
        engine, leader, comm = self.loop.engine, self.loop.leader, self.loop.comm
        if leader is None or comm is None or leader.switching:
            return
        if all(r in engine.plan.present for r in comm.members):
            return
        now = time.monotonic()
        if now - self._grown_at < GROW_RETRY_S:
            return
        self._grown_at = now
        try:
            target = degraded_plan(
                engine.record, comm.members, max_slots_per_rank=self.max_slots_per_rank
            )
        except PlanError as error:  # more members than before: cannot happen, but never wedge
            log.error("no layout over ranks %s: %s", list(comm.members), error)
            return
        log.info(
            "ranks %s get their experts", [r for r in comm.members if r not in engine.plan.present]
        )
        leader.grow(engine.record, target, self.switch_timeout)

    def _layout(self, comm: Comm) -> Callable[[Plan], Plan | None]:
        """How the leader serves a new plan: over this epoch's members."""
        members, most = comm.members, self.max_slots_per_rank

        def layout(plan: Plan) -> Plan | None:
            if len(members) == plan.world_size:
                return None
            return degraded_plan(plan, members, max_slots_per_rank=most)

        return layout

    # ------------------------------------------------------------ every member

    def _adopt(self, regroup: Regroup, comm: Comm) -> str | None:
        """Undo the step the group did not finish, move the engine and the switch to the new
        epoch, and check this member serves what the leader does; why not, else None."""
        loop, m = self.loop, self.membership
        last = loop.runner.last_step
        if last is not None and last > regroup.committed:
            loop.runner.rewind()
        loop.engine.join_epoch(comm)
        loop.switch.join_epoch(comm)
        if m.rank in regroup.joined:
            loop.engine.install(regroup.layout, {}, regroup.record)
            loop.step = regroup.committed + 1
            return None
        if loop.engine.plan.digest() != regroup.layout.digest():
            return (
                f"rank {m.rank} serves plan {loop.engine.plan.version} as another layout than "
                f"the leader's (a switch was flipping when the group changed)"
            )
        return None
