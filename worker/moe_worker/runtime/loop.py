"""One rank's serving loop, in lock-step with the group.

Every step the leader (rank 0) asks its scheduler what to do and broadcasts a `StepDescriptor`
(plain JSON): sequences to release, its part of a plan switch, new sequences with their rank,
every rank's chunks, or stop. Each rank then does the same things in the same order: free,
switch (`switch.commands.RankSwitch`), admit, one forward when any rank has work (zero tokens
still join every all-to-all), sample; the leader gathers every rank's tokens, failures and switch
state and hands events to the requests' sinks (`serving.leader.Leader` is that side: scheduler,
traffic, plan-switch queue). With nothing to do the leader still broadcasts an idle step at least
every `leader.IDLE_TICK` seconds, so the group stays alive and a hung peer shows as a stall.

A group that runs its own membership (`runtime.membership`) survives a member: when a collective
fails or is abandoned (`comm.GroupFailed`: a member lost, or this rank's epoch over) every
survivor moves to the next membership epoch and regroups (`runtime.regroup`), then serves on;
the leader also moves the group to a new epoch at a step boundary when a rank asks to join. A
step is committed when the leader has every rank's result: a step begun and not committed is
undone and run again.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from moe_worker.ep import group
from moe_worker.ep.comm import Comm, GroupFailed
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.metrics import WorkerMetrics
from moe_worker.runtime.membership import Changes, Membership
from moe_worker.runtime.regroup import Regrouper
from moe_worker.runtime.state import RankState
from moe_worker.serving.leader import Leader
from moe_worker.serving.step import StepDescriptor, StepResult
from moe_worker.switch.commands import RankSwitch

log = logging.getLogger("moe_worker")


class _Planned(Exception):
    """The leader changes the group at a step boundary (ranks join)."""

    def __init__(self, changes: Changes) -> None:
        super().__init__("ranks join")
        self.changes = changes


class ServingLoop:
    def __init__(
        self,
        engine: EPEngine,
        runner: ModelRunner,
        switch: RankSwitch,
        leader: Leader | None,
        state: RankState,
        metrics: WorkerMetrics,
        membership: Membership | None = None,
        *,
        max_slots_per_rank: int | None = None,
        switch_timeout: float = 60.0,
    ) -> None:
        self.engine, self.runner, self.switch = engine, runner, switch
        self.leader, self.state, self.metrics = leader, state, metrics
        self.membership = membership
        self.comm: Comm | None = membership.comm if membership is not None else None
        self.regrouper = (
            Regrouper(self, membership, max_slots_per_rank, switch_timeout)
            if membership is not None
            else None
        )
        self.step = 0
        self.committed = -1
        """The last step whose every result the leader has (a later one may be undone)."""

    def run(self, joining: bool = False) -> None:
        """Step until the leader broadcasts stop (a rank also leaves once it is stopping).
        `joining`: this rank was just let into a running group: regroup with it first."""
        if joining and self.regrouper is not None:
            self.regrouper.sync()
        if self.membership is not None:
            self.membership.serving()
            self.state.group_changed(self.comm, self.engine)
        while True:
            try:
                self._steps()
                return
            except GroupFailed as failure:
                if self.regrouper is None or self.state.stopping.is_set():
                    raise  # stopping: the others are going too (process.serve says so)
                self.regrouper.regroup(str(failure))
            except _Planned as planned:
                assert self.regrouper is not None
                self.regrouper.regroup("ranks join", planned.changes)

    def _steps(self) -> None:
        while True:
            text = None
            if self.leader is not None:
                self._admit_joiners()
                stopping = self.state.stopping.is_set()
                step = self.leader.next_step(self.step, self.engine.plan.version, stopping)
                text = step.to_json()
            descriptor = StepDescriptor.from_json(group.broadcast_text(text, self.comm))
            self.state.stepped()
            if descriptor.stop or (self.state.stopping.is_set() and self.leader is None):
                return
            if not descriptor.idle:
                self._execute(descriptor)
                self.state.stepped()
            self.step = descriptor.step + 1

    def _admit_joiners(self) -> None:
        """Leader, at a step boundary: ranks asking to join enter at the next epoch (never in
        the middle of a switch: the one that brings them their experts comes after), and
        members holding nothing get their experts (again, after a switch that failed)."""
        if self.membership is None or self.leader is None or self.leader.switching:
            return
        changes = self.membership.changes()
        if changes.joining and not changes.lost:
            raise _Planned(Changes({}, changes.joining))
        if self.regrouper is not None:
            self.regrouper.grow_back()

    def _execute(self, d: StepDescriptor) -> None:
        self.runner.begin_step(d.step)
        copy_errors = self.runner.copy_prefixes(d.copies)  # before release: a source may go
        self.runner.release(d.release)
        if d.switch is not None:
            answer = self.switch.step(d.switch)
            if answer is not None and self.leader is not None:
                self.leader.answer_switch(answer)
                if self.regrouper is not None:
                    self.regrouper.switched()
        errors = copy_errors + self.runner.admit(d.admit)
        result = StepResult(errors=tuple(errors), switch=self.switch.state())
        if d.chunks:
            start = time.perf_counter()
            tokens_before = self.runner.tokens_run
            stepped = self.runner.step(d.chunks, two_batch=d.two_batch)
            result = dataclasses.replace(
                stepped, errors=result.errors + stepped.errors, switch=result.switch
            )
            self.metrics.step_latency.observe(time.perf_counter() - start)
            self.metrics.tokens.inc(self.runner.tokens_run - tokens_before)
        if d.gathers:
            texts = group.gather_text(result.to_json(), self.comm)
            if self.leader is not None:
                self.leader.complete([StepResult.from_json(t) for t in texts])
                self.committed = d.step
