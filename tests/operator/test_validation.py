"""Cross-field rules: every bad spec names the field and the fix; every good one passes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_operator.validation import parse_spec

CPU = {"worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0}}

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("topK above experts", {"model": {"topK": 17}}, "model.topK"),
    ("TP not dividing heads", {"parallelism": {"tensor": 3}}, "parallelism.tensor"),
    ("PP not dividing layers", {"parallelism": {"pipeline": 3}}, "parallelism.pipeline"),
    ("too few slots", {"parallelism": {"expert": 8}}, "placement.slotsPerRank"),
    ("Replace without spare slots", {"rebalancing": {"method": "Replace"}}, "rebalancing.method"),
    ("nccl on cpu", {"worker": {"device": "cpu", "gpusPerPod": 0}}, "worker.backend"),
    ("cuda without GPUs", {"worker": {"gpusPerPod": 0}}, "worker.gpusPerPod"),
    ("port clash", {"worker": {"port": 29500}}, "worker.masterPort"),
    (
        "reserved env",
        {"worker": {"extraEnv": [{"name": "MOE_RANK", "value": "3"}]}},
        "worker.extraEnv",
    ),
    ("prometheus without url", {"metrics": {"source": "Prometheus"}}, "metrics.prometheusUrl"),
    ("wrong type", {"model": {"layers": "many"}}, "model.layers"),
    ("unknown field", {"model": {"experts": 8}}, "model.experts"),
    (
        "out of range",
        {"rebalancing": {"imbalanceThreshold": 0.5}},
        "rebalancing.imbalanceThreshold",
    ),
]


@pytest.mark.parametrize(("why", "spec", "field"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_specs_are_refused_naming_the_field(why: str, spec: dict[str, Any], field: str) -> None:
    parsed, problems = parse_spec(spec)
    assert parsed is None
    assert field in [problem.field for problem in problems], problems
    assert all(str(problem).startswith("spec.") for problem in problems)


def test_defaults_are_valid() -> None:
    parsed, problems = parse_spec({})
    assert problems == [] and parsed is not None


def test_all_problems_are_reported_at_once() -> None:
    _, problems = parse_spec({"model": {"topK": 20}, "worker": {"port": 29500}})
    assert {problem.field for problem in problems} == {"model.topK", "worker.masterPort"}


def test_slots_fix_names_the_value_that_works() -> None:
    _, problems = parse_spec({"parallelism": {"expert": 6}})
    (problem,) = problems
    assert "raise slotsPerRank to 3" in problem.message  # ceil(16 / 6)
    parsed, after = parse_spec({"parallelism": {"expert": 6}, "placement": {"slotsPerRank": 3}})
    assert after == [] and parsed is not None


@given(
    experts=st.integers(1, 64),
    ranks=st.integers(1, 32),
    slots=st.integers(1, 8),
    top_k=st.integers(1, 8),
)
def test_capacity_and_topk_rules_match_arithmetic(
    experts: int, ranks: int, slots: int, top_k: int
) -> None:
    spec = {
        **CPU,
        "model": {"expertsPerLayer": experts, "topK": top_k},
        "parallelism": {"expert": ranks},
        "placement": {"slotsPerRank": slots},
    }
    parsed, problems = parse_spec(spec)
    fits = ranks * slots >= experts and top_k <= experts
    assert (parsed is not None) == fits, problems


def test_max_slots_per_rank_below_slots_per_rank_is_refused_with_the_fix() -> None:
    parsed, problems = parse_spec({"placement": {"slotsPerRank": 2, "maxSlotsPerRank": 1}})
    assert parsed is None
    (problem,) = [p for p in problems if p.field == "placement.maxSlotsPerRank"]
    assert "below slotsPerRank 2" in problem.message and "0 (the default" in problem.message


def test_replace_may_rely_on_slots_it_can_add() -> None:
    refused, problems = parse_spec({"rebalancing": {"method": "Replace"}})
    assert refused is None and "placement.maxSlotsPerRank" in problems[0].message
    parsed, problems = parse_spec(
        {"rebalancing": {"method": "Replace"}, "placement": {"maxSlotsPerRank": 2}}
    )
    assert problems == [] and parsed is not None
    assert parsed.placement.most_slots_per_rank == 2


@pytest.mark.parametrize(
    ("gating", "field"),
    [
        ({"maxMargin": 1.5}, "rebalancing.gating.maxMargin"),
        ({"maxReroutedFraction": -0.1}, "rebalancing.gating.maxReroutedFraction"),
        ({"damping": 1.0}, "rebalancing.gating.damping"),
        ({"gateBiasRate": 0.01}, "rebalancing.gating.gateBiasRate"),  # v1alpha1: moved, not kept
    ],
)
def test_gating_settings_out_of_range_name_their_field(gating: dict, field: str) -> None:
    parsed, problems = parse_spec({"rebalancing": {"gating": gating}})
    assert parsed is None and field in [problem.field for problem in problems]


def test_the_old_top_level_gate_bias_fields_are_refused() -> None:
    parsed, problems = parse_spec({"rebalancing": {"maxGateBias": 0.1}})
    assert parsed is None and problems[0].field == "rebalancing.maxGateBias"
