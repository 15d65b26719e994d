"""The leader's side of the serving loop: where each step's descriptor comes from, and where the
step's outcome goes.

It owns the scheduler, the built-in traffic and the queue of plan switches the HTTP threads ask
for. `next_step` waits (at most `IDLE_TICK`) for something to do, then turns it into a
`StepDescriptor`; `complete` hands every rank's tokens to the scheduler and the events to the
requests' sinks; `answer_switch` wakes the HTTP thread waiting on the switch it carried. No torch
and no process group here: the runtime does the collectives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_worker.generation import AdmissionError, EventSink, GenerationRequest, TokenEvent
from moe_worker.metrics import WorkerMetrics
from moe_worker.plan import Plan
from moe_worker.scheduler import Delivery, Scheduler, SchedulerConfig
from moe_worker.step import StepDescriptor, StepResult
from moe_worker.traffic import TrafficSource

log = logging.getLogger("moe_worker")

IDLE_TICK = 0.2
"""Longest the leader waits before broadcasting an idle step (keeps collectives alive)."""


@dataclass
class Switch:
    """A plan switch asked for by an HTTP thread, answered by the serving loop."""

    plan: Plan
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    taken: bool = False
    """The loop put it in a step descriptor: it will be answered."""
    cancelled: bool = False
    """Its caller timed out before the loop took it: it never will."""


class Leader:
    def __init__(
        self, config: SchedulerConfig, traffic: TrafficSource, metrics: WorkerMetrics
    ) -> None:
        self.scheduler = Scheduler(config)
        self.traffic, self.metrics = traffic, metrics
        self._wake = threading.Event()
        self._switches: queue.Queue[Switch] = queue.Queue()
        self._switch_lock = threading.Lock()
        self._in_flight: Switch | None = None
        metrics.requests_waiting.set_function(lambda: self.scheduler.waiting)
        metrics.requests_running.set_function(lambda: self.scheduler.running)

    # ------------------------------------------------------------ HTTP threads

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        self.scheduler.add(request, on_event)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._wake.set()

    def switch(self, plan: Plan, timeout: float) -> dict[str, Any] | None:
        """Block until the loop switched every rank to `plan` (or found it stale); None after
        `timeout` (a switch not yet taken then never happens)."""
        pending = Switch(plan)
        self._switches.put(pending)
        self._wake.set()
        if pending.done.wait(timeout):
            return pending.result
        with self._switch_lock:
            pending.cancelled = not pending.taken
        return None

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ the serving loop

    def next_step(self, step: int, plan_version: int, stopping: bool) -> StepDescriptor:
        if stopping:
            self.deliver(self.scheduler.drain("abort"))
            return StepDescriptor(step, stop=True)
        self._wait_for_work()
        switch = self._in_flight = self._take_switch(plan_version)
        self._top_up_traffic()
        scheduled = self.scheduler.schedule()
        self.deliver(list(scheduled.deliveries))
        return StepDescriptor(
            step,
            release=scheduled.release,
            plan_json=None if switch is None else switch.plan.to_json(),
            admit=scheduled.admit,
            chunks=scheduled.chunks,
        )

    def answer_switch(self, result: dict[str, Any]) -> None:
        if self._in_flight is not None:
            self._answer(self._in_flight, result)
            self._in_flight = None

    def complete(self, results: Sequence[StepResult]) -> None:
        self.deliver(self.scheduler.complete(results))

    def fail_all(self, error: str) -> None:
        self.deliver(self.scheduler.drain("error", error))

    def deliver(self, deliveries: list[Delivery]) -> None:
        for sink, event in deliveries:
            self.metrics.generated_tokens.inc(len(event.token_ids))
            if event.finish_reason is not None:
                self.metrics.requests_finished.labels(event.finish_reason).inc()
            try:
                sink(event)
            except Exception:  # a client's callback must not stop the group
                log.exception("event sink of request %s failed", event.request_id)

    def _wait_for_work(self) -> None:
        self._wake.clear()
        if self.scheduler.has_work or not self._switches.empty():
            return
        wait = IDLE_TICK
        if self.traffic.enabled:
            wait = min(wait, max(0.0, self.traffic.next_top_up - time.monotonic()))
        self._wake.wait(wait)

    def _take_switch(self, plan_version: int) -> Switch | None:
        while True:
            try:
                pending = self._switches.get_nowait()
            except queue.Empty:
                return None
            with self._switch_lock:
                if pending.cancelled:
                    continue
                pending.taken = True
            if pending.plan.version > plan_version:
                return pending
            self._answer(pending, {"applied": False, "reason": "stale", "version": plan_version})

    @staticmethod
    def _answer(pending: Switch, result: dict[str, Any]) -> None:
        pending.result = result
        pending.done.set()

    def _top_up_traffic(self) -> None:
        if not self.traffic.due(time.monotonic()):
            return
        for request in self.traffic.top_up(time.monotonic()):
            try:
                self.scheduler.add(request, self._traffic_sink)
            except AdmissionError:
                self.traffic.done(request.request_id)

    def _traffic_sink(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.traffic.done(event.request_id)
