"""The leader's side of the serving loop: where each step's descriptor comes from, and where the
step's outcome goes.

It owns the scheduler, the built-in traffic and the queue of plan switches the HTTP threads ask
for. While ranks are out of the group, a plan is served as its layout over the ranks in it
(`layout`: `moe_contract.elastic.degraded_plan`), and a rank back in gets its experts by an
internal switch to the layout over every rank in the group (`grow`). `next_step` waits (at most
`IDLE_TICK`) for something to do, then turns it into a `StepDescriptor`; `complete` hands every
rank's tokens to the scheduler and the events to the requests' sinks; `answer_switch` wakes the
HTTP thread waiting on the switch it carried. No torch, no process group and no metrics library
here: the runtime does the collectives, and counts what the leader delivers through
`count_delivery`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moe_contract.plan import Plan, PlanError
from moe_contract.switch import (
    DOES_NOT_FIT,
    GROUP_FAILED,
    STALE,
    TIMEOUT,
    TRANSFER_FAILED,
    SwitchAnswer,
)
from moe_worker.serving.generation import AdmissionError, EventSink, GenerationRequest, TokenEvent
from moe_worker.serving.scheduler import Delivery, Scheduler, SchedulerConfig
from moe_worker.serving.step import Chunk, StepDescriptor, StepResult, SwitchCommand
from moe_worker.serving.traffic import TrafficSource

log = logging.getLogger("moe_worker")

IDLE_TICK = 0.2
"""Longest the leader waits before broadcasting an idle step (keeps collectives alive)."""
POLL_TICK = 0.01
"""Longest it waits while a background switch is in flight: each step polls every rank."""
ANSWER_GRACE = 10.0
"""How long past its timeout a caller waits for the answer of a switch the loop took: the loop
abandons a background switch at its deadline and answers at the next step."""


@dataclass
class Switch:
    """A plan switch asked for by an HTTP thread, answered by the serving loop."""

    plan: Plan
    done: threading.Event = field(default_factory=threading.Event)
    answer: SwitchAnswer | None = None
    taken: bool = False
    """The loop put it in a step descriptor: it will be answered."""
    cancelled: bool = False
    """Its caller timed out before the loop took it: it never will."""
    deadline: float = float("inf")
    """time.monotonic() after which a background switch still moving experts is abandoned."""
    serve: Plan | None = None
    """The layout of `plan` served while ranks are out of the group (None: `plan` itself)."""
    internal: bool = False
    """The group's own (a rank back in): no HTTP thread waits for it."""


@dataclass
class _Transfers:
    """A background switch in flight: what the ranks last reported."""

    switch: Switch
    states: list[str | None] = field(default_factory=list)


class Leader:
    def __init__(
        self,
        config: SchedulerConfig,
        traffic: TrafficSource,
        *,
        count_delivery: Callable[[TokenEvent], None] = lambda event: None,
        background_switch: bool = False,
        two_batch: bool = False,
    ) -> None:
        """`count_delivery` sees every event handed to a request's sink (the worker's metrics
        count generated tokens and finished requests from them)."""
        self.scheduler = Scheduler(config)
        self.traffic, self.count_delivery = traffic, count_delivery
        self.background_switch, self.two_batch = background_switch, two_batch
        self._transfers: _Transfers | None = None
        self._wake = threading.Event()
        self._switches: queue.Queue[Switch] = queue.Queue()
        self._switch_lock = threading.Lock()
        self._in_flight: Switch | None = None
        self.draining = False
        """Set by the runtime's drain: no more built-in traffic is generated."""
        self._grow: Switch | None = None
        self.layout: Callable[[Plan], Plan | None] = lambda plan: None
        """The layout a plan is served as while ranks are out of the group (None: the plan
        itself); PlanError (NoRoom) when the group cannot hold it."""

    # ------------------------------------------------------------ HTTP threads

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        self.scheduler.add(request, on_event)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._wake.set()

    def switch(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Block until the loop switched every rank to `plan` (or found it stale); `timeout`
        after `timeout` seconds (a switch not yet taken then never happens)."""
        pending = Switch(plan, deadline=time.monotonic() + timeout)
        self._switches.put(pending)
        self._wake.set()
        if not pending.done.wait(timeout):
            with self._switch_lock:
                pending.cancelled = not pending.taken
            if pending.taken:  # the loop answers it
                pending.done.wait(ANSWER_GRACE)
        return pending.answer or SwitchAnswer.refused(TIMEOUT)

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Requests the scheduler holds, waiting or running (read from any thread)."""
        return self.scheduler.waiting + self.scheduler.running

    @property
    def idle(self) -> bool:
        """Nothing left to run, release or abort: a drain is done."""
        return not self.scheduler.has_work

    # ------------------------------------------------------------ the serving loop

    def next_step(self, step: int, plan_version: int, stopping: bool) -> StepDescriptor:
        if stopping:
            self.deliver(self.scheduler.drain("abort"))
            return StepDescriptor(step, stop=True)
        self._wait_for_work()
        switch = self._switch_command(plan_version)
        self._top_up_traffic()
        scheduled = self.scheduler.schedule()
        self.deliver(list(scheduled.deliveries))
        return StepDescriptor(
            step,
            release=scheduled.release,
            admit=scheduled.admit,
            chunks=scheduled.chunks,
            switch=switch,
            two_batch=self.two_batch and _most_tokens_of_a_rank(scheduled.chunks) >= 2,
            copies=scheduled.copies,
        )

    def answer_switch(self, answer: SwitchAnswer) -> None:
        """The serving loop's answer to the switch in flight (applied, stale, abandoned)."""
        if self._in_flight is not None:
            if not self._in_flight.internal:
                self._answer(self._in_flight, answer)
            self._in_flight = None
        self._transfers = None

    # ------------------------------------------------------------ the group changing

    def grow(self, record: Plan, layout: Plan, timeout: float) -> None:
        """Switch every rank to `layout` (of `record`, the plan served) when the switch in
        flight ends: the experts of ranks back in the group come from their holders."""
        self._grow = Switch(
            record, deadline=time.monotonic() + timeout, serve=layout, internal=True
        )
        self._wake.set()

    def regroup(self, lost: Sequence[int], joined: Sequence[int], error: str) -> list[str]:
        """A new membership epoch: the step in flight is undone (every rank undoes it), the
        switch in flight dropped (answered with `error`; the old plan serves), the requests of
        `lost` ranks resumed on the others. Returns the ids resumed."""
        self.scheduler.rewind()
        if self._in_flight is not None and not self._in_flight.internal:
            self._answer(self._in_flight, SwitchAnswer.refused(TRANSFER_FAILED, error=error))
        self._in_flight = self._transfers = None
        self._grow = None
        resumed = self.scheduler.lose(lost) if lost else []
        if joined:
            self.scheduler.welcome(joined)
        self._wake.set()
        return resumed

    @property
    def switching(self) -> bool:
        """A switch is in flight (or an internal one waits to start)."""
        return self._in_flight is not None or self._grow is not None

    def complete(self, results: Sequence[StepResult]) -> None:
        if self._transfers is not None:
            self._transfers.states = [r.switch for r in results]
        self.deliver(self.scheduler.complete(results))

    def fail_all(self, error: str) -> None:
        """The serving loop failed: every request ends, a switch in flight is answered (the
        group restarts as a whole, on the plan of record)."""
        self.answer_switch(SwitchAnswer.refused(GROUP_FAILED, error=error))
        self.deliver(self.scheduler.drain("error", error))

    def deliver(self, deliveries: list[Delivery]) -> None:
        for sink, event in deliveries:
            self.count_delivery(event)
            try:
                sink(event)
            except Exception:  # a client's callback must not stop the group
                log.exception("event sink of request %s failed", event.request_id)

    def _switch_command(self, plan_version: int) -> SwitchCommand | None:
        """This step's part of a plan switch: start one, poll, flip, or abandon it."""
        t = self._transfers
        if t is None:
            if self._in_flight is not None:
                return None
            switch = self._in_flight = self._take_switch(plan_version)
            if switch is None:
                return None
            if self.background_switch:
                self._transfers = _Transfers(switch)
            return SwitchCommand.start(
                switch.plan, background=self.background_switch, serve=switch.serve
            )
        failed = [f"rank {r}: {s}" for r, s in enumerate(t.states) if s and s.startswith("fail")]
        if failed:
            return SwitchCommand.abandon("; ".join(failed))
        if t.states and all(state == "done" for state in t.states):
            return SwitchCommand.flip(t.switch.plan.version)
        if time.monotonic() > t.switch.deadline:
            return SwitchCommand.abandon("timeout: experts still moving at the switch timeout")
        return SwitchCommand.poll()

    def _wait_for_work(self) -> None:
        self._wake.clear()
        if self._transfers is not None:  # poll the ranks until the switch lands
            self._wake.wait(0 if self.scheduler.has_work else POLL_TICK)
            return
        queued = self._grow is not None or not self._switches.empty()
        if self.scheduler.has_work or (self._in_flight is None and queued):
            return
        wait = IDLE_TICK
        if self.traffic.enabled:
            wait = min(wait, max(0.0, self.traffic.next_top_up - time.monotonic()))
        self._wake.wait(wait)

    def _take_switch(self, plan_version: int) -> Switch | None:
        if self._grow is not None:
            grow, self._grow = self._grow, None
            return grow
        while True:
            try:
                pending = self._switches.get_nowait()
            except queue.Empty:
                return None
            with self._switch_lock:
                if pending.cancelled:
                    continue
                pending.taken = True
            if pending.plan.version <= plan_version:
                self._answer(pending, SwitchAnswer.refused(STALE, version=plan_version))
                continue
            try:
                pending.serve = self.layout(pending.plan)
            except PlanError as error:  # no room for it on the ranks in the group
                self._answer(pending, SwitchAnswer.refused(DOES_NOT_FIT, error=str(error)))
                continue
            return pending

    @staticmethod
    def _answer(pending: Switch, answer: SwitchAnswer) -> None:
        pending.answer = answer
        pending.done.set()

    def _top_up_traffic(self) -> None:
        if self.draining or not self.traffic.due(time.monotonic()):
            return
        for request in self.traffic.top_up(time.monotonic()):
            try:
                self.scheduler.add(request, self._traffic_sink)
            except AdmissionError:
                self.traffic.done(request.request_id)

    def _traffic_sink(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.traffic.done(event.request_id)


def _most_tokens_of_a_rank(chunks: Sequence[Chunk]) -> int:
    """New tokens of the busiest rank this step: fewer than 2 leave nothing to split."""
    tokens: dict[int, int] = {}
    for chunk in chunks:
        tokens[chunk.rank] = tokens.get(chunk.rank, 0) + chunk.length
    return max(tokens.values(), default=0)
