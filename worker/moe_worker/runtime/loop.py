"""One rank's serving loop, in lock-step with the group.

Every step the leader (rank 0) asks its scheduler what to do and broadcasts a `StepDescriptor`
(plain JSON): sequences to release, its part of a plan switch, new sequences with their rank,
every rank's chunks, or stop. Each rank then does the same things in the same order: free,
switch (`switch.commands.RankSwitch`), admit, one forward when any rank has work (zero tokens
still join every all-to-all), sample; the leader gathers every rank's tokens, failures and switch
state and hands events to the requests' sinks (`serving.leader.Leader` is that side: scheduler,
traffic, plan-switch queue). With nothing to do the leader still broadcasts an idle step at least
every `leader.IDLE_TICK` seconds, so the group stays alive and a hung peer shows as a stall.
"""

from __future__ import annotations

import dataclasses
import time

from moe_worker.ep import group
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.metrics import WorkerMetrics
from moe_worker.runtime.state import RankState
from moe_worker.serving.leader import Leader
from moe_worker.serving.step import StepDescriptor, StepResult
from moe_worker.switch.commands import RankSwitch


class ServingLoop:
    def __init__(
        self,
        engine: EPEngine,
        runner: ModelRunner,
        switch: RankSwitch,
        leader: Leader | None,
        state: RankState,
        metrics: WorkerMetrics,
    ) -> None:
        self.engine, self.runner, self.switch = engine, runner, switch
        self.leader, self.state, self.metrics = leader, state, metrics

    def run(self) -> None:
        """Step until the leader broadcasts stop (a rank also leaves once it is stopping)."""
        step = 0
        while True:
            text = None
            if self.leader is not None:
                stopping = self.state.stopping.is_set()
                text = self.leader.next_step(step, self.engine.plan.version, stopping).to_json()
            descriptor = StepDescriptor.from_json(group.broadcast_text(text))
            self.state.stepped()
            if descriptor.stop or (self.state.stopping.is_set() and self.leader is None):
                return
            if not descriptor.idle:
                self._execute(descriptor)
                self.state.stepped()
            step += 1

    def _execute(self, d: StepDescriptor) -> None:
        copy_errors = self.runner.copy_prefixes(d.copies)  # before release: a source may go
        self.runner.release(d.release)
        if d.switch is not None:
            answer = self.switch.step(d.switch)
            if answer is not None and self.leader is not None:
                self.leader.answer_switch(answer)
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
            texts = group.gather_text(result.to_json())
            if self.leader is not None:
                self.leader.complete([StepResult.from_json(t) for t in texts])
