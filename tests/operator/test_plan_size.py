"""Object sizes at DeepSeek scale against Kubernetes' 1 MiB, and the plan's compact stored form.

DeepSeek-V3 is 58 MoE layers x 256 routed experts; served at EP256 with 2 slots per rank (and
room to grow to 4) its plan ConfigMap must hold the plan, with a gate bias under Auto, twice
during a group restart for a new shape, and its status the per-layer figures of 58 layers.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import COMPACT_FROM_BYTES, Plan, PlanError, parse_plan
from moe_operator.api import RebalanceRecord
from moe_operator.manifests import children
from moe_operator.status import Observed, compute_status
from moe_operator.validation import MAX_PLAN_BYTES, parse_spec, plan_bytes_bound

LIMIT = 1 << 20
LAYERS, EXPERTS, RANKS = 58, 256, 256


def deepseek_plan(slots_per_rank: int, bias: bool, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    slots = tuple(
        tuple(tuple(rng.randrange(EXPERTS) for _ in range(slots_per_rank)) for _ in range(RANKS))
        for _ in range(LAYERS)
    )
    gate_bias = (
        tuple(tuple(rng.uniform(-0.2, 0.2) for _ in range(EXPERTS)) for _ in range(LAYERS))
        if bias
        else None
    )
    method = "GatingBias" if bias else "Replace"
    return Plan(
        version=7,
        slotsPerRank=slots_per_rank,
        slots=slots,
        gateBias=gate_bias,
        method=method,
        ranksPerPod=8,
    )


def deepseek_spec(max_slots: int, method: str = "Auto") -> dict:
    return {
        "model": {
            "layers": LAYERS,
            "expertsPerLayer": EXPERTS,
            "hiddenSize": 7168,
            "ffnHiddenSize": 2048,
            "attentionHeads": 128,
            "headDim": 128,
            "topK": 8,
            "dtype": "bfloat16",
        },
        "parallelism": {"expert": RANKS},
        "placement": {"slotsPerRank": 2, "maxSlotsPerRank": max_slots},
        "worker": {"gpusPerPod": 8},
        "rebalancing": {"method": method},
    }


@pytest.mark.parametrize("slots_per_rank", [2, 4])
def test_the_plan_configmap_at_deepseek_scale_stays_well_under_the_limit(
    slots_per_rank: int,
) -> None:
    old, new = deepseek_plan(2, bias=True), deepseek_plan(slots_per_rank, bias=True, seed=1)
    record = RebalanceRecord(method="Replace", note="x" * 2000)
    annotations = {children.LAST_REBALANCE_ANNOTATION: record.model_dump_json(by_alias=True)}
    # during a group restart for a new shape the ConfigMap holds both shapes' plans
    configmap = children.build_plan_configmap("deepseek", {"a": old, "b": new}, annotations)
    size = len(json.dumps(configmap, separators=(",", ":")))
    assert size < LIMIT * 0.6
    for key, plan in (("a", old), ("b", new)):
        stored = configmap["data"][key]
        assert len(plan.to_json()) > COMPACT_FROM_BYTES  # too big plain: stored compact
        assert len(stored) < len(plan.to_json()) * 0.6
        assert parse_plan(stored) == plan  # what a worker reads from its mounted plan.json
        assert parse_plan(stored).digest() == plan.digest()


def test_validation_bounds_the_stored_plan_and_now_admits_deepseek_under_auto() -> None:
    for max_slots in (2, 4):
        spec, problems = parse_spec(deepseek_spec(max_slots), "deepseek")
        assert problems == [] and spec is not None
        table, bias = plan_bytes_bound(spec)
        stored = len(deepseek_plan(max_slots, bias=True).to_stored_json())
        assert stored <= table + bias <= MAX_PLAN_BYTES
    # a plain plan under the compact threshold: the bound is the plain JSON's
    small = dict(deepseek_spec(2, "Replace"), parallelism={"expert": 16})
    small["model"] = {**small["model"], "layers": 4, "expertsPerLayer": 16}
    spec, problems = parse_spec(small, "small")
    assert spec is not None, problems
    table, bias = plan_bytes_bound(spec)
    assert bias == 0 and table < COMPACT_FROM_BYTES


def test_status_at_deepseek_scale_is_small() -> None:
    observed = Observed(
        generation=3,
        workers=32,
        statefulset_exists=True,
        ready_workers=31,
        worst_imbalance=1.37,
        rerouted_fraction=tuple(0.05 for _ in range(LAYERS)),
        gate_bias_active=True,
        loads_problem=f"ranks {list(range(RANKS))} have no pod address yet",
        handoff_problem="leader refused plan 9: " + "y" * 500,
        was_running=True,
    )
    status = compute_status(observed, [], "2026-01-01T00:00:00Z")
    status["lastRebalance"] = RebalanceRecord(note="z" * 1000).model_dump(by_alias=True)
    assert len(json.dumps(status)) < 16 * 1024


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 300),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_the_compact_form_is_the_same_plan(
    layers: int, ranks: int, per_rank: int, experts: int, bias: bool, rng: random.Random
) -> None:
    slots = tuple(
        tuple(tuple(rng.randrange(experts) for _ in range(per_rank)) for _ in range(ranks))
        for _ in range(layers)
    )
    gate_bias = (
        tuple(tuple(rng.uniform(-1, 1) for _ in range(experts)) for _ in range(layers))
        if bias
        else None
    )
    plan = Plan(version=2, slotsPerRank=per_rank, slots=slots, gateBias=gate_bias)
    compact = json.dumps(plan.to_compact_document())
    assert parse_plan(compact) == plan
    assert parse_plan(compact).digest() == plan.digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [1, 2]}, "slots: .*shape must be 3 positive integers"),
        ({"shape": [1, 2, 3]}, "slots: .*data holds 8 bytes, shape"),
        ({"encoding": "int8"}, "slots: .*encoding must be 'uint16-le-base64'"),
        ({"data": "not base64!"}, "slots: .*not base64"),
    ],
)
def test_a_broken_compact_form_names_the_field(change: dict, message: str) -> None:
    plan = Plan(version=2, slotsPerRank=2, slots=(((0, 1), (1, 0)),))
    document = plan.to_compact_document()
    document["slots"] = {**document["slots"], **change}
    with pytest.raises(PlanError, match=message):
        parse_plan(json.dumps(document))
