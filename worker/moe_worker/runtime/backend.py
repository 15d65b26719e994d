"""The `generation.Backend` of one rank: what the HTTP layer sees of it (probes, metrics, the plan,
and on the leader generation and plan switches).

HTTP threads only read the rank's state and queue work for the serving loop (`Leader.submit`,
`abort`, `switch`, which wake it); nothing here waits on compute except a plan switch, which
blocks its own thread until every rank switched.
"""

from __future__ import annotations

from collections.abc import Callable

from moe_contract.group import REGROUPING, GroupStatus
from moe_contract.plan import Plan
from moe_contract.plan import validate_plan as check_plan
from moe_contract.switch import NOT_READY, STALE, SwitchAnswer
from moe_worker.metrics import WorkerMetrics, exposition
from moe_worker.runtime.state import RankState
from moe_worker.serving.generation import (
    DRAINING,
    DrainState,
    EventSink,
    GenerationRequest,
    ModelCard,
    NotReady,
    ServingLoad,
)
from moe_worker.serving.leader import Leader
from moe_worker.settings import WorkerSettings


class RankBackend:
    def __init__(
        self,
        settings: WorkerSettings,
        card: ModelCard,
        state: RankState,
        leader: Leader | None,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings, self._card, self.state = settings, card, state
        self.leader, self.metrics = leader, metrics
        self.on_drain: Callable[[], None] = state.draining.set
        """What POST /v1/drain starts (the runtime's drain)."""
        self.report_lost: Callable[[list[int], str], bool] = lambda ranks, reason: False
        """Set by the runtime: the leader drops these ranks at once."""

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def is_leader(self) -> bool:
        return self.settings.is_leader

    @property
    def card(self) -> ModelCard:
        return self._card

    def is_ready(self) -> bool:
        return self.state.is_ready(leader=self.is_leader)

    def is_live(self) -> bool:
        return self.state.is_live(self.settings.stall_timeout)

    def metrics_text(self) -> bytes:
        return exposition(self.metrics.registry, self.rank)

    def current_plan(self) -> Plan | None:
        return self.state.plan()

    def validate_plan(self, plan: Plan) -> None:
        """The plan fits the model, the world, the slots per rank this group may grow to, and
        (measured on CUDA) the leader's free memory; PlanError with the reason (HTTP 422)."""
        s, m = self.settings, self.settings.model
        check_plan(
            plan,
            num_layers=m.layers,
            num_experts=m.experts,
            world_size=s.world_size,
            max_slots_per_rank=s.max_slots_per_rank,
        )
        current, switch = self.state.plan(), self.state.switch
        if switch is not None and current is not None and plan.version > current.version:
            switch.mover.check_memory(plan)

    def drain(self) -> DrainState:
        self.on_drain()
        return self.drain_state()

    def drain_state(self) -> DrainState:
        in_flight = None if self.leader is None else self.leader.in_flight
        timeout = self.settings.drain_timeout
        return DrainState(self.state.draining.is_set(), in_flight, timeout)

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        if self.leader is None:
            raise NotReady("only the leader (rank 0) serves requests")
        if self.state.draining.is_set():
            raise NotReady(DRAINING)
        if not self.is_ready():
            raise NotReady("the worker group is not ready")
        self.leader.submit(request, on_event)

    def abort(self, request_id: str) -> None:
        if self.leader is not None:
            self.leader.abort(request_id)

    def load(self) -> ServingLoad:
        return ServingLoad() if self.leader is None else self.leader.scheduler.load()

    def group_status(self) -> GroupStatus | None:
        view = self.state.group
        if view is None:
            return None
        resumed = 0 if self.leader is None else self.leader.scheduler.resumed_total
        return GroupStatus(
            epoch=view.epoch,
            world=view.world,
            live=view.members,
            joining=tuple(r for r in view.members if r not in view.holders),
            state=view.state,
            reason=view.regrouping if view.state == REGROUPING else None,
            resumed_requests=resumed,
        )

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Leader: block until every rank serves `plan`; the stale answer if it is not newer."""
        current = self.current_plan()
        if self.leader is None or current is None or not self.is_ready():
            return SwitchAnswer.refused(NOT_READY, version=current and current.version)
        if plan.version <= current.version:
            return SwitchAnswer.refused(STALE, version=current.version)
        return self.leader.switch(plan, timeout)
