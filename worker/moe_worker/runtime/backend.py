"""The `generation.Backend` of one rank: what the HTTP layer sees of it (probes, metrics, the plan,
and on the leader generation and plan switches).

HTTP threads only read the rank's state and queue work for the serving loop (`Leader.submit`,
`abort`, `switch`, which wake it); nothing here waits on compute except a plan switch, which
blocks its own thread until every rank switched.
"""

from __future__ import annotations

from moe_contract.plan import Plan
from moe_contract.plan import validate_plan as check_plan
from moe_contract.switch import NOT_READY, STALE, SwitchAnswer
from moe_worker.metrics import WorkerMetrics, exposition
from moe_worker.runtime.state import RankState
from moe_worker.serving.generation import (
    EventSink,
    GenerationRequest,
    Load,
    ModelCard,
    NotReady,
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

    def load(self) -> Load:
        if self.leader is None:
            return Load()
        scheduler = self.leader.scheduler
        capacity = sum(allocator.capacity_tokens for allocator in scheduler.allocators)
        free = sum(allocator.free_tokens for allocator in scheduler.allocators)
        return Load(scheduler.waiting, scheduler.running, capacity - free, capacity)

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

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        if self.leader is None:
            raise NotReady("only the leader (rank 0) serves requests")
        if not self.is_ready():
            raise NotReady("the worker group is not ready")
        self.leader.submit(request, on_event)

    def abort(self, request_id: str) -> None:
        if self.leader is not None:
            self.leader.abort(request_id)

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Leader: block until every rank serves `plan`; the stale answer if it is not newer."""
        current = self.current_plan()
        if self.leader is None or current is None or not self.is_ready():
            return SwitchAnswer.refused(NOT_READY, version=current and current.version)
        if plan.version <= current.version:
            return SwitchAnswer.refused(STALE, version=current.version)
        return self.leader.switch(plan, timeout)
