"""One control step of the real operator code against 256 fake ranks (32 pods of 8).

The ranks are `moe_local.fake_ranks` HTTP servers (threads, no torch) answering /metrics for
their pod's ranks as workers do, and /v1/plan on pod 0; the operator's `PodWorkers` reads them
and `rebalance.control_step` runs as the timer would: a first read opens the window, the second
evaluates, plans, writes the plan ConfigMap and hands the plan to the leader. A second
deployment has one pod that never answers in time: the step still ends within the read's
deadline, with the evaluation skipped and the slow pod named.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from moe_contract.plan import Plan, round_robin_plan
from moe_local.fake_ranks import FakeRanks
from moe_operator import rebalance
from moe_operator.api import MoEDeploymentSpec, RebalanceRecord
from moe_operator.manifests import children
from moe_operator.planning.detection import DetectionState
from moe_operator.validation import parse_spec
from moe_operator.workers import PodWorkers

RANKS, PER_POD, LAYERS, EXPERTS, SLOTS = 256, 8, 8, 256, 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spec_of(port: int) -> MoEDeploymentSpec:
    raw = {
        "model": {
            "layers": LAYERS,
            "expertsPerLayer": EXPERTS,
            "hiddenSize": 7168,
            "ffnHiddenSize": 2048,
            "attentionHeads": 128,
            "headDim": 128,
            "topK": 8,
        },
        "parallelism": {"expert": RANKS},
        "placement": {"slotsPerRank": SLOTS},
        "worker": {
            "backend": "gloo",
            "device": "cpu",
            "gpusPerPod": 0,
            "ranksPerPod": PER_POD,
            "port": port,
        },
        "rebalancing": {"consecutiveEvaluations": 1, "cooldownSeconds": 0},
    }
    spec, problems = parse_spec(raw, "deepseek")
    assert spec is not None, problems
    return spec


class Store:
    """The plan's durable record, built as the operator builds the ConfigMap."""

    def __init__(self, spec: MoEDeploymentSpec) -> None:
        self.spec, self.configmap = spec, None

    def write(self, plan: Plan, record: RebalanceRecord | None, issued_at: float) -> None:
        key = children.plan_shape(self.spec).key
        self.configmap = children.build_plan_configmap("deepseek", {key: plan})


@pytest.fixture
def ranks(request: pytest.FixtureRequest) -> Iterator[tuple[FakeRanks, MoEDeploymentSpec]]:
    port = free_port()
    load = (np.random.default_rng(0).lognormal(0, 1, (LAYERS, EXPERTS)) * 1000).round()
    fake = FakeRanks(
        round_robin_plan(LAYERS, EXPERTS, RANKS, SLOTS),
        load.tolist(),
        PER_POD,
        port,
        slow_pods=frozenset(getattr(request, "param", ())),
    )
    fake.start()
    yield fake, spec_of(port)
    fake.stop()


def _step(fake: FakeRanks, spec: MoEDeploymentSpec, timeout: float) -> tuple[Any, Any, Store]:
    workers = PodWorkers(fake.pod_objects("deepseek"), spec, "ns", "deepseek", lambda: fake.token)
    workers.read_timeout = timeout
    store, window = Store(spec), rebalance.Window()
    state = DetectionState(desired_version=1, applied_version=1)
    first = rebalance.control_step(spec, fake.plan, state, window, workers, store, 1000.0)
    later = 1000.0 + spec.rebalancing.evaluation_window_seconds
    second = rebalance.control_step(spec, first.desired, first.state, window, workers, store, later)
    return first, second, store


def test_one_step_reads_256_ranks_plans_and_hands_off(
    ranks: tuple[FakeRanks, MoEDeploymentSpec],
) -> None:
    fake, spec = ranks
    first, second, store = _step(fake, spec, timeout=3.0)
    assert first.loads_problem is None and second.loads_problem is None
    assert second.rebalance is not None, second.events
    assert second.rebalance.imbalance_after < second.rebalance.imbalance_before / 2
    assert [plan.version for plan in fake.posted] == [2]  # the leader switched to the new plan
    assert fake.posted[0].ranks_per_pod == PER_POD
    assert second.applied_version == 2 and second.desired.version == 2
    # every rank was read, each pod once per read: 2 reads x 32 pods
    assert fake.scrapes == 2 * RANKS // PER_POD
    configmap = json.dumps(store.configmap, separators=(",", ":"))
    assert len(configmap) < (1 << 20) / 8
    rebalanced = [event for event in second.events if event[1] == "Rebalanced"]
    assert rebalanced and "cross-pod" in rebalanced[0][2]


@pytest.mark.parametrize("ranks", [{5}], indirect=True)
def test_a_pod_that_never_answers_costs_one_evaluation_not_the_step(
    ranks: tuple[FakeRanks, MoEDeploymentSpec],
) -> None:
    fake, spec = ranks
    started = time.monotonic()
    first, second, _ = _step(fake, spec, timeout=0.5)
    assert time.monotonic() - started < 4  # two reads, each within its 1 s deadline
    for outcome in (first, second):
        assert outcome.skipped == "unreadable"
        assert "ranks 40..47" in (outcome.loads_problem or "")  # pod 5, by its ranks
    assert fake.posted == []
