"""The operator's control step against real `moe-worker serve` processes (gloo, 4 ranks).

Skewed traffic (the workers' generated requests, whose prompt tokens follow a Zipf law over the
vocabulary, so the model's own router sends popular tokens' experts more work) produces imbalance;
the operator's own control step — the code the kopf timer runs — reads the real /metrics, detects
it, plans, and hands the plan to the real leader, which switches every rank without a restart.
Once with Replace (spare slots) and once with GatingBias (the seed's layout: one slot per rank,
as many experts as ranks).
Kubernetes is left out here (the pods' addresses are known); tests/e2e runs the same loop in the
local cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_contract.plan import Plan
from moe_operator import handoff, loads
from moe_operator.api import MoEDeploymentSpec, RebalanceRecord
from moe_operator.manifests.children import plan_shape
from moe_operator.planning.detection import DetectionState
from moe_operator.planning.ledger import Ledger
from moe_operator.rebalance import Window, control_step
from tests.worker.worker_harness import Cluster, parse_metric

pytestmark = pytest.mark.distributed
WORLD = 4


@dataclass
class DirectWorkers:
    """`rebalance.Workers` for processes whose addresses are known (no API server)."""

    cluster: Cluster
    spec: MoEDeploymentSpec

    def read_counters(self) -> loads.CounterSnapshot:
        targets = [loads.Target(rank, self.cluster.url(rank, "/metrics")) for rank in range(WORLD)]
        model = self.spec.model
        return loads.read_direct(
            targets, world_size=WORLD, num_layers=model.layers, num_experts=model.experts_per_layer
        )

    def serving(self) -> handoff.Served:
        return handoff.serving(self.cluster.url(0, ""), self.cluster.token)

    def post_plan(self, plan: Plan) -> handoff.HandoffResult:
        return handoff.post_plan(self.cluster.url(0, ""), plan, self.cluster.token)


class NoStore:
    def __init__(self) -> None:
        self.plans: list[Plan] = []

    def write(self, plan: Plan, record: RebalanceRecord | None, issued_at: float) -> None:
        self.plans.append(plan)


def _spec(experts: int, slots: int, method: str) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(
        {
            "model": {
                "layers": 2,
                "expertsPerLayer": experts,
                "hiddenSize": 32,
                "ffnHiddenSize": 64,
                "attentionHeads": 2,
                "headDim": 16,
                "topK": 2,
                "dtype": "float32",
            },
            "parallelism": {"expert": WORLD},
            "placement": {"slotsPerRank": slots},
            "worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0},
            "rebalancing": {
                "method": method,
                "imbalanceThreshold": 1.15,
                "evaluationWindowSeconds": 3,
                "consecutiveEvaluations": 1,
                "cooldownSeconds": 0,
                # Token-driven skew moves in chunks (one popular token is a third of the traffic),
                # so a small first bias that at most doubles per plan; workers do not report the
                # bias's price yet, so no cap.
                "gating": {"rate": 0.4, "maxBias": 0.5, "maxReroutedFraction": 1.0},
            },
        }
    )


def _worker_env(spec: MoEDeploymentSpec) -> dict[str, str]:
    model = spec.model
    return {
        "MOE_LAYERS": str(model.layers),
        "MOE_EXPERTS_PER_LAYER": str(model.experts_per_layer),
        "MOE_HIDDEN_SIZE": str(model.hidden_size),
        "MOE_FFN_HIDDEN_SIZE": str(model.ffn_hidden_size),
        "MOE_ATTENTION_HEADS": str(model.attention_heads),
        "MOE_HEAD_DIM": str(model.head_dim),
        "MOE_TOP_K": str(model.top_k),
        "MOE_DTYPE": model.dtype,
        "MOE_SLOTS_PER_RANK": str(spec.placement.slots_per_rank),
        "MOE_TRAFFIC_BATCH": "2",
        "MOE_TRAFFIC_SEQ_LEN": "16",
        "MOE_TRAFFIC_ZIPF": "1.5",
        "MOE_TRAFFIC_INTERVAL": "0.02",
    }


def _run_loop(
    spec: MoEDeploymentSpec, tmp: Path, rebalances: int
) -> tuple[list[float], Cluster, list[int]]:
    """Drive the control step until `rebalances` plans are applied plus one window after."""
    cluster = Cluster(tmp, WORLD, _worker_env(spec))
    try:
        cluster.wait_ready()
        pids = [proc.pid for proc in cluster.procs]
        workers, store = DirectWorkers(cluster, spec), NoStore()
        desired, state, window = plan_shape(spec).round_robin(1), DetectionState(), Window()
        ledger = Ledger()
        worst: list[float] = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            opened = window.started_at
            outcome = control_step(
                spec, desired, ledger, state, window, workers, store, time.time()
            )
            desired, ledger, state = outcome.desired, outcome.ledger, outcome.state
            evaluated = window.started_at != opened and outcome.loads_problem is None
            if evaluated and outcome.layer_imbalance:  # a fresh, usable window was measured
                worst.append(max(outcome.layer_imbalance))
            if (
                len(store.plans) >= rebalances
                and not outcome.ledger.in_flight
                and len(worst) > rebalances + 1
            ):
                break
            time.sleep(0.5)
        assert [proc.pid for proc in cluster.procs] == pids
        assert all(proc.poll() is None for proc in cluster.procs), "a worker restarted or died"
        versions = {
            parse_metric(cluster.request(rank, "/metrics")[1], "moe_plan_version")[
                (("rank", str(rank)),)
            ]
            for rank in range(WORLD)
        }
        assert versions == {float(desired.version)}, versions
        print(f"worst-layer imbalance per window: {[round(w, 2) for w in worst]}")
        return worst, cluster, [plan.version for plan in store.plans]
    finally:
        cluster.stop()


def test_replace_lowers_measured_imbalance_without_restarts(tmp_path: Path) -> None:
    spec = _spec(experts=8, slots=3, method="Auto")  # spare slots: Auto means Replace
    worst, _, versions = _run_loop(spec, tmp_path, rebalances=1)
    assert versions[0] == 2
    before, after = worst[0], worst[-1]
    assert before > spec.rebalancing.imbalance_threshold, worst
    assert after < before and after < spec.rebalancing.imbalance_threshold, worst


def test_gating_bias_lowers_measured_imbalance_on_the_seed_layout(tmp_path: Path) -> None:
    spec = _spec(experts=WORLD, slots=1, method="Auto")  # no spare slot: Auto means GatingBias
    worst, _, versions = _run_loop(spec, tmp_path, rebalances=3)
    assert versions[:3] == [2, 3, 4]
    before, after = worst[0], worst[-1]
    assert before > spec.rebalancing.imbalance_threshold, worst
    assert after < before, worst
