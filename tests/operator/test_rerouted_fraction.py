"""The measured price of a gate bias in the control loop: the rerouted fraction per layer from
the workers' counters, the planner shrinking a bias above the cap (with an Event, whatever
detection says), the bias kept up (and decaying) while the load is balanced, and the price in
status. Fake workers in memory, as in test_rebalance: the seed's layout, 4 ranks x 4 experts x
1 slot, where GatingBias is the only lever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_contract.plan import Plan, round_robin_plan
from moe_operator.api import MoEDeploymentSpec, PlanStatus
from moe_operator.handoff import HandoffResult, PlanRefused, Served
from moe_operator.loads import CounterSnapshot
from moe_operator.planning.detection import DetectionState
from moe_operator.planning.ledger import Ledger
from moe_operator.rebalance import StepOutcome, Window, control_step, rerouted_fractions
from moe_operator.status import Observed, compute_status


def spec(**rebalancing: Any) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(
        {
            "model": {
                "layers": 2,
                "expertsPerLayer": 4,
                "hiddenSize": 8,
                "ffnHiddenSize": 16,
                "attentionHeads": 2,
                "headDim": 4,
                "topK": 2,
                "dtype": "float32",
            },
            "parallelism": {"expert": 4},
            "placement": {"slotsPerRank": 1, "maxSlotsPerRank": 1},
            "worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0},
            "rebalancing": {
                "evaluationWindowSeconds": 10,
                "imbalanceThreshold": 1.2,
                **rebalancing,
            },
        }
    )


def biased(bias: float, version: int = 2) -> Plan:
    row = (bias, -bias / 3, -bias / 3, -bias / 3)
    return round_robin_plan(2, 4, 4, version=version).model_copy(
        update={"gate_bias": (row, row), "gate_max_margin": 0.05, "method": "GatingBias"}
    )


@dataclass
class PricedWorkers:
    """Four ranks, one expert each; a window's tokens follow `popularity`, and the bias reroutes
    `price_per_bias` x max |bias| of each layer's top-K assignments (a worker's counters)."""

    served: Plan
    popularity: tuple[float, ...]
    price_per_bias: float = 4.0
    rerouted_counted: bool = True
    tokens: dict[int, dict[tuple[int, int], float]] = field(default_factory=dict)
    rerouted: dict[int, dict[int, float]] = field(default_factory=dict)
    posts: list[Plan] = field(default_factory=list)

    def read_counters(self) -> CounterSnapshot:
        for layer in range(2):
            bias = self.served.gate_bias[layer] if self.served.gate_bias else (0.0,) * 4
            fraction = min(1.0, self.price_per_bias * max(abs(b) for b in bias))
            for rank in range(4):
                load = 1000 * self.popularity[rank]
                key = (layer, rank)  # round robin: expert e on rank e
                tokens = self.tokens.setdefault(rank, {})
                tokens[key] = tokens.get(key, 0.0) + load
                counted = self.rerouted.setdefault(rank, {})
                counted[layer] = counted.get(layer, 0.0) + fraction * load
        return CounterSnapshot(
            counters={r: dict(c) for r, c in self.tokens.items()},
            plan_versions={},
            rerouted={r: dict(c) for r, c in self.rerouted.items()}
            if self.rerouted_counted
            else {},
        )

    def serving(self) -> Served:
        return Served(self.served.version, self.served.digest())

    def post_plan(self, plan: Plan) -> HandoffResult:
        self.posts.append(plan)
        self.served = plan
        return HandoffResult(plan.version, 0.01)


@dataclass
class Store:
    written: list[Plan] = field(default_factory=list)

    def write(self, plan: Plan, record: object, issued_at: float) -> None:
        self.written.append(plan)


def evaluate_twice(
    deployment: MoEDeploymentSpec, workers: PricedWorkers, state: DetectionState | None = None
) -> StepOutcome:
    """Open a window, then evaluate it (the served plan is the desired one, applied)."""
    window, store, served = Window(started_at=0.0), Store(), workers.served
    ledger = Ledger(served.version, served.version, served.digest())
    state = state or DetectionState()
    control_step(deployment, served, ledger, state, window, workers, store, now=10.0)
    return control_step(deployment, served, ledger, state, window, workers, store, now=20.0)


def magnitude(plan: Plan) -> float:
    assert plan.gate_bias is not None
    return max(abs(b) for row in plan.gate_bias for b in row)


def test_the_rerouted_fraction_is_rerouted_over_all_assignments_of_the_layer() -> None:
    before = CounterSnapshot(
        counters={0: {(0, 0): 100.0, (1, 0): 10.0}, 1: {(0, 1): 100.0, (1, 1): 10.0}},
        plan_versions={},
        rerouted={0: {0: 5.0, 1: 0.0}, 1: {0: 5.0, 1: 0.0}},
    )
    after = CounterSnapshot(
        counters={0: {(0, 0): 400.0, (1, 0): 10.0}, 1: {(0, 1): 200.0, (1, 1): 10.0}},
        plan_versions={},
        rerouted={0: {0: 45.0, 1: 0.0}, 1: {0: 5.0}},
    )
    # Layer 0: 40 rerouted of 400 assignments; layer 1: rank 1 lost its series (unknown).
    assert rerouted_fractions(before, after, 2) == (0.1, None)
    restarted = CounterSnapshot(after.counters, {}, rerouted={0: {0: 1.0}, 1: {0: 9.0}})
    assert rerouted_fractions(before, restarted, 1) == (None,)  # a counter went down
    assert rerouted_fractions(before, before, 1) == (None,)  # no traffic: nothing to divide
    older = CounterSnapshot(after.counters, {})  # workers without the counter
    assert rerouted_fractions(older, after, 2) == (None, None)


def test_a_bias_above_the_price_cap_shrinks_at_once_with_an_event() -> None:
    # Detection holds (the streak rule wants 5 evaluations); the cap does not wait for it.
    deployment = spec(consecutiveEvaluations=5, cooldownSeconds=3600, method="GatingBias")
    workers = PricedWorkers(biased(0.1), popularity=(3.0, 1.0, 1.0, 1.0))  # 0.4 rerouted
    outcome = evaluate_twice(deployment, workers)
    assert outcome.rerouted_fraction == (0.4, 0.4)
    assert [plan.version for plan in workers.posts] == [3]
    assert magnitude(workers.posts[0]) < magnitude(biased(0.1)) * 0.5  # aimed under the cap
    events = {reason: message for _, reason, message in outcome.events}
    assert "GateBiasCapped" in events and "0.400" in events["GateBiasCapped"]
    assert "maxReroutedFraction 0.1" in events["GateBiasCapped"]


def test_under_the_cap_and_above_the_threshold_detection_decides_as_before() -> None:
    deployment = spec(consecutiveEvaluations=5, cooldownSeconds=0, method="GatingBias")
    workers = PricedWorkers(biased(0.01), popularity=(3.0, 1.0, 1.0, 1.0))  # 0.04 rerouted
    outcome = evaluate_twice(deployment, workers)
    assert outcome.rerouted_fraction == (0.04, 0.04)
    assert workers.posts == [] and outcome.events == []  # 1 of 5 evaluations: hold


def test_a_bias_on_balanced_load_keeps_being_updated_and_decays() -> None:
    deployment = spec(cooldownSeconds=0, method="GatingBias")
    workers = PricedWorkers(biased(0.1), popularity=(1.0, 1.0, 1.0, 1.0), price_per_bias=0.5)
    outcome = evaluate_twice(deployment, workers)
    assert [plan.version for plan in workers.posts] == [3]
    assert magnitude(workers.posts[0]) < magnitude(biased(0.1))  # the leak, nothing to push
    assert "RebalanceNotWorthIt" not in {reason for _, reason, _ in outcome.events}
    # Within the cooldown a balanced bias is left alone.
    calm = spec(cooldownSeconds=3600, method="GatingBias")
    workers = PricedWorkers(biased(0.1), popularity=(1.0, 1.0, 1.0, 1.0), price_per_bias=0.5)
    evaluate_twice(calm, workers, DetectionState(last_rebalance_at=5.0))
    assert workers.posts == []


def test_status_shows_the_price_per_layer_and_in_the_balanced_condition() -> None:
    observed = Observed(
        generation=1,
        workers=4,
        statefulset_exists=True,
        ready_workers=4,
        plan=PlanStatus(version=3, applied_version=3),
        worst_imbalance=1.1,
        rerouted_fraction=(0.08, None, 0.02),
        max_rerouted_fraction=0.1,
        gate_bias_active=True,
    )
    status = compute_status(observed, [], "2026-01-01T00:00:00Z")
    assert status["reroutedFraction"] == {
        "max": 0.08,
        "mean": 0.05,
        "perLayer": [0.08, -1.0, 0.02],
        "cap": 0.1,
    }
    (balanced,) = [c for c in status["conditions"] if c["type"] == "Balanced"]
    assert "rerouted 0.080 of top-K assignments on the worst layer" in balanced["message"]
    unmeasured = compute_status(Observed(generation=1, workers=4), [], "2026-01-01T00:00:00Z")
    assert "reroutedFraction" not in unmeasured


@dataclass
class RefusingWorkers(PricedWorkers):
    """A leader that refuses every new plan, as a rank short of memory makes it (HTTP 422)."""

    def post_plan(self, plan: Plan) -> HandoffResult:
        raise PlanRefused(
            f"leader refused plan {plan.version}: HTTP 422: slotsPerRank: plan {plan.version} "
            "needs 4.30 GiB more on rank 2 (cuda:0), which has 1.10 GiB free; lower "
            "placement.maxSlotsPerRank"
        )


def test_a_plan_the_workers_refuse_is_reported_once_and_kept_in_status() -> None:
    deployment = spec(method="GatingBias", cooldownSeconds=0)
    workers = RefusingWorkers(biased(0.1, version=1), popularity=(1.0,) * 4)
    window, store = Window(started_at=0.0), Store()
    desired = biased(0.05, version=2)  # issued, not yet served
    state, ledger = DetectionState(), Ledger(desired=2, applied=1, digest=desired.digest())
    reasons = []
    for now in (1.0, 2.0, 3.0):
        outcome = control_step(deployment, desired, ledger, state, window, workers, store, now)
        reasons += [reason for _, reason, _ in outcome.events]
        assert outcome.handoff_problem is not None and "HTTP 422" in outcome.handoff_problem
        assert "placement.maxSlotsPerRank" in outcome.handoff_problem
    assert reasons == ["PlanRefused"]  # news once, not at every step
