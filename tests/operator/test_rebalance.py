"""The control step with fake workers: ordering, retries and restarts of the hand-off.

The workers here are in-memory fakes on purpose: these tests pin the sequencing (durable write
before POST, retry without a new version, convergence after a restart). The same flow runs
against a mock API server in tests/kmock and against real worker processes in tests/e2e.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_contract.plan import Plan, validate_plan
from moe_operator.api import MoEDeploymentSpec, RebalanceRecord
from moe_operator.handoff import HandoffError, HandoffResult, Served
from moe_operator.loads import CounterSnapshot, LoadReadError
from moe_operator.manifests.children import plan_shape
from moe_operator.planning.detection import DetectionState
from moe_operator.planning.ledger import Ledger
from moe_operator.rebalance import (
    PlanStoreConflict,
    Window,
    control_step,
    gating_options,
    rebalanced_events,
)

SPEC = MoEDeploymentSpec.model_validate(
    {
        "model": {
            "layers": 2,
            "expertsPerLayer": 4,
            "hiddenSize": 8,
            "ffnHiddenSize": 16,
            "attentionHeads": 2,
            "headDim": 4,
            "topK": 1,
            "dtype": "float32",
        },
        "parallelism": {"expert": 2},
        "placement": {"slotsPerRank": 3},
        "worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0},
        "rebalancing": {
            "evaluationWindowSeconds": 10,
            "consecutiveEvaluations": 1,
            "cooldownSeconds": 0,
            "imbalanceThreshold": 1.2,
        },
    }
)


def initial_plan(spec: MoEDeploymentSpec) -> Plan:
    return plan_shape(spec).round_robin(1)


@dataclass
class FakeWorkers:
    """Two ranks serving `served`; rank loads follow the plan and a skewed expert popularity."""

    served: Plan
    popularity: tuple[float, ...] = (8.0, 1.0, 1.0, 1.0)
    reachable: bool = True
    garbage: bool = False
    posts: list[int] = field(default_factory=list)
    totals: dict[int, dict[tuple[int, int], float]] = field(default_factory=dict)

    def read_counters(self) -> CounterSnapshot:
        if self.garbage:
            raise LoadReadError("rank 1: malformed metrics text")
        for layer in range(2):
            places = self.served.replicas(layer)
            for expert, share in enumerate(self.popularity):
                for rank, _ in places[expert]:
                    counters = self.totals.setdefault(rank, {})
                    key = (layer, expert)
                    counters[key] = counters.get(key, 0.0) + 100 * share / len(places[expert])
        for rank in range(2):
            for layer in range(2):
                for expert in range(4):
                    self.totals.setdefault(rank, {}).setdefault((layer, expert), 0.0)
        return CounterSnapshot(
            counters={r: dict(c) for r, c in self.totals.items()}, plan_versions={}
        )

    def serving(self) -> Served:
        if not self.reachable:
            raise HandoffError("connection refused")
        return Served(self.served.version, self.served.digest())

    def post_plan(self, plan: Plan) -> HandoffResult:
        if not self.reachable:
            raise HandoffError("connection refused")
        if plan.version <= self.served.version:
            return HandoffResult(self.served.version, None, stale=True)
        self.posts.append(plan.version)
        self.served = plan
        return HandoffResult(plan.version, 0.01)


@dataclass
class Store:
    written: list[Plan] = field(default_factory=list)
    records: list[RebalanceRecord | None] = field(default_factory=list)
    conflict: bool = False  # someone else wrote the ConfigMap since the step read it

    def write(self, plan: Plan, record: RebalanceRecord | None, issued_at: float) -> None:
        if self.conflict:
            raise PlanStoreConflict("plan ConfigMap changed")
        self.written.append(plan)
        self.records.append(record)


def _run(
    workers: FakeWorkers,
    store: Store,
    desired: Plan,
    state: DetectionState,
    window: Window,
    now: float,
    ledger: Ledger | None = None,
):  # type: ignore[no-untyped-def]
    return control_step(SPEC, desired, ledger or Ledger(), state, window, workers, store, now)


def test_skewed_load_yields_a_new_plan_written_before_it_is_posted() -> None:
    plan = initial_plan(SPEC)
    workers, store, window = FakeWorkers(plan), Store(), Window(started_at=0.0)
    first = _run(workers, store, plan, DetectionState(), window, now=10.0)
    assert first.rebalance is None and store.written == []  # first snapshot opens the window
    second = _run(workers, store, plan, first.state, window, now=20.0)
    assert second.rebalance is not None
    assert [p.version for p in store.written] == [2] and workers.posts == [2]
    assert second.ledger.applied == 2 and second.desired.version == 2
    validate_plan(second.desired, num_layers=2, num_experts=4, world_size=2)
    assert second.rebalance.imbalance_after < second.rebalance.imbalance_before
    assert any(reason == "Rebalanced" for _, reason, _ in second.events)


def test_the_rebalanced_event_comes_once_when_its_plan_is_first_seen_served() -> None:
    plan = initial_plan(SPEC)
    workers, store, window = FakeWorkers(plan), Store(), Window(started_at=0.0)
    first = _run(workers, store, plan, DetectionState(), window, now=10.0)
    workers.reachable = False  # issued and written, not handed over
    issued = _run(workers, store, plan, first.state, window, now=20.0, ledger=first.ledger)
    assert issued.rebalance is not None and issued.ledger.in_flight
    assert not [e for e in issued.events if e[1] == "Rebalanced"]
    # The next step (maybe another operator's, after a restart: only the record survives)
    workers.reachable = True
    served = control_step(
        SPEC, issued.desired, issued.ledger, issued.state, window, workers, store, 21.0,
        issued.rebalance,
    )  # fmt: skip
    (event,) = [e for e in served.events if e[1] == "Rebalanced"]
    assert event[2].startswith("plan 2: imbalance ") and "(Replace)" in event[2]
    again = control_step(
        SPEC, served.desired, served.ledger, served.state, window, workers, store, 22.0,
        issued.rebalance,
    )  # fmt: skip
    assert not [e for e in again.events if e[1] == "Rebalanced"]


def test_rebalanced_events_only_on_the_step_that_first_sees_the_version() -> None:
    record = RebalanceRecord(method="Replace", from_version=1, to_version=3, note="n")
    assert rebalanced_events(1, 3, record)[0][2].startswith("plan 3: imbalance 0.00 -> 0.00")
    assert rebalanced_events(2, 4, record)  # seen past it: a later plan served since
    assert rebalanced_events(3, 3, record) == rebalanced_events(1, 2, record) == []
    assert rebalanced_events(1, 3, None) == []


def test_unreachable_leader_keeps_the_plan_and_retries_without_a_new_version() -> None:
    plan = initial_plan(SPEC)
    workers, store, window = FakeWorkers(plan), Store(), Window(started_at=0.0)
    first = _run(workers, store, plan, DetectionState(), window, now=10.0)
    workers.reachable = False
    down = _run(workers, store, plan, first.state, window, now=20.0, ledger=first.ledger)
    assert [p.version for p in store.written] == [2]  # decided and recorded durably
    assert workers.posts == [] and not down.in_contact and down.handoff_problem
    assert down.ledger == Ledger(2, 1, down.desired.digest())  # the last answer stands
    workers.reachable = True
    healed = _run(workers, store, down.desired, down.state, window, now=21.0, ledger=down.ledger)
    assert workers.posts == [2] and healed.ledger.applied == 2
    assert [p.version for p in store.written] == [2]  # no second plan for the same decision


def test_restarted_operator_converges_to_the_durable_plan() -> None:
    plan = initial_plan(SPEC)
    workers = FakeWorkers(plan)
    pending = plan.with_version(2)  # written to the ConfigMap, never posted: the operator died
    outcome = _run(workers, Store(), pending, DetectionState(), Window(started_at=0.0), now=1.0)
    assert workers.posts == [2] and outcome.ledger.applied == 2
    again = _run(workers, Store(), pending, outcome.state, Window(started_at=0.0), now=2.0)
    assert workers.posts == [2] and again.ledger.applied == 2  # resent never re-applied


def test_bad_load_data_never_produces_a_plan() -> None:
    plan = initial_plan(SPEC)
    workers, store, window = FakeWorkers(plan, garbage=True), Store(), Window(started_at=0.0)
    state = DetectionState()
    for now in (10.0, 20.0, 30.0):
        outcome = _run(workers, store, plan, state, window, now)
        state = outcome.state
        assert outcome.loads_problem and "malformed" in outcome.loads_problem
        assert outcome.skipped == "unreadable"  # counted by moe_load_evaluations_skipped_total
    assert store.written == [] and workers.posts == []


def test_counter_reset_skips_the_window() -> None:
    plan = initial_plan(SPEC)
    workers = FakeWorkers(plan, popularity=(1.0, 1.0, 1.0, 1.0))
    store, window = Store(), Window(started_at=0.0)
    state = _run(workers, store, plan, DetectionState(), window, now=10.0).state
    state = _run(workers, store, plan, state, window, now=20.0).state
    workers.totals = {}  # a restarted worker starts its counters from zero
    outcome = _run(workers, store, plan, state, window, now=30.0)
    assert outcome.loads_problem and "went down" in outcome.loads_problem
    assert outcome.skipped == "unusable"
    assert store.written == []


def test_balanced_load_changes_nothing() -> None:
    plan = initial_plan(SPEC)
    workers = FakeWorkers(plan, popularity=(1.0, 1.0, 1.0, 1.0))
    store, window, state = Store(), Window(started_at=0.0), DetectionState()
    for now in (10.0, 20.0, 30.0):
        outcome = _run(workers, store, plan, state, window, now)
        state = outcome.state
        assert outcome.skipped is None
    assert store.written == [] and max(outcome.layer_imbalance) < 1.2


def test_a_plan_in_the_configmap_counts_as_issued_even_if_status_lost_it() -> None:
    """The operator died after writing v2 but before its status said so; the leader still fails:
    no v3 may be planned on top of a v2 that never reached the workers."""
    plan = initial_plan(SPEC)
    workers, store = FakeWorkers(plan, reachable=False), Store()
    written = plan.with_version(2)  # the ConfigMap's plan; detection state still says version 1
    stale = Ledger(desired=1, applied=1, digest=plan.digest())  # status before v2 was written
    window, state, ledger = Window(started_at=0.0), DetectionState(), stale
    for now in (10.0, 20.0, 30.0):
        outcome = _run(workers, store, written, state, window, now, ledger)
        state, ledger = outcome.state, outcome.ledger
        assert ledger.in_flight and ledger.desired == 2
    assert store.written == [] and outcome.desired.version == 2
    workers.reachable = True
    healed = _run(workers, store, written, state, window, now=31.0, ledger=ledger)
    assert workers.posts == [2] and healed.ledger.applied == 2


def test_a_plan_of_the_desired_version_with_other_contents_is_not_applied() -> None:
    """Someone posted their own plan 2 to the leader (a guessed token): the operator does not
    count it as its plan 2; it issues its plan again as 3, durable first, and hands it off."""
    plan = initial_plan(SPEC)
    ours = plan.with_version(2)
    theirs = Plan.model_validate({**ours.to_document(), "method": "Forged"})
    workers, store = FakeWorkers(theirs), Store()
    outcome = _run(workers, store, ours, DetectionState(), Window(started_at=0.0), now=1.0)
    assert [p.version for p in store.written] == [3] and store.records == [None]
    assert store.written[0].slots == ours.slots and store.written[0].method == ours.method
    assert workers.posts == [3] and workers.served.digest() == store.written[0].digest()
    assert outcome.desired.version == 3 and outcome.ledger.applied == 3
    assert any(reason == "ForeignPlan" for _, reason, _ in outcome.events)


def test_a_newer_foreign_plan_is_superseded_not_adopted() -> None:
    plan = initial_plan(SPEC)
    theirs = Plan.model_validate({**plan.with_version(9).to_document(), "method": "Forged"})
    workers, store = FakeWorkers(theirs), Store()
    outcome = _run(workers, store, plan, DetectionState(), Window(started_at=0.0), now=1.0)
    assert [p.version for p in store.written] == [10] and workers.posts == [10]
    assert outcome.ledger.applied == 10


def test_a_resend_answered_stale_counts_only_if_the_leader_serves_our_digest() -> None:
    plan = initial_plan(SPEC)
    ours = plan.with_version(2)
    workers = FakeWorkers(ours)
    outcome = _run(workers, Store(), ours, DetectionState(), Window(started_at=0.0), now=1.0)
    assert outcome.ledger.applied == 2 and outcome.handoff_problem is None and not workers.posts


def test_a_lost_race_for_the_configmap_posts_nothing() -> None:
    plan = initial_plan(SPEC)
    workers, store, window = FakeWorkers(plan), Store(), Window(started_at=0.0)
    state = _run(workers, store, plan, DetectionState(), window, now=10.0).state
    store.conflict = True
    outcome = _run(workers, store, plan, state, window, now=20.0)
    assert outcome.rebalance is None and workers.posts == [] and outcome.desired == plan
    assert any(reason == "PlanConflict" for _, reason, _ in outcome.events)


def test_spare_memory_grows_the_slots_per_rank_and_the_plan_still_fits_the_spec() -> None:
    # Expert 0 carries 8 of 11 units: two slots per rank cannot split it, a third one can.
    spec = SPEC.model_copy(
        update={"placement": SPEC.placement.model_copy(update={"slots_per_rank": 2})}
    )
    grown_spec = spec.model_copy(
        update={"placement": spec.placement.model_copy(update={"max_slots_per_rank": 3})}
    )
    for current, most in ((spec, 2), (grown_spec, 3)):
        plan = initial_plan(current)
        workers, store, window = FakeWorkers(plan), Store(), Window(started_at=0.0)
        step = (window, workers, store)
        first = control_step(current, plan, Ledger(), DetectionState(), *step, 10.0)
        second = control_step(current, plan, first.ledger, first.state, *step, 20.0)
        assert second.desired.slots_per_rank == most
        if most == 3:
            assert second.rebalance is not None and "grown 2 -> 3" in second.rebalance.note
            assert second.rebalance.imbalance_after < second.rebalance.imbalance_before
            # a restart keeps the grown plan, unless the maximum went down
            assert plan_shape(current).problem(second.desired) is None
            assert "exceeds the 2 slots" in (plan_shape(spec).problem(second.desired) or "")


def test_the_spec_gating_section_reaches_the_planner() -> None:
    spec = SPEC.model_copy(
        update={
            "rebalancing": SPEC.rebalancing.model_copy(
                update={
                    "gating": SPEC.rebalancing.gating.model_copy(
                        update={"max_margin": 0.02, "max_rerouted_fraction": 0.3, "rate": 1.5}
                    )
                }
            )
        }
    )
    options = gating_options(spec)
    assert (options.max_margin, options.max_rerouted_fraction, options.rate) == (0.02, 0.3, 1.5)
    assert (options.max_bias, options.damping) == (0.2, 0.05)  # the API's defaults
