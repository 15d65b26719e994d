"""One set of rebalancing defaults: the API's (and the CRD's) are the planners' own.

api.RebalancingSpec and GatingSpec take their defaults from detection.DetectionPolicy and
gating.GatingOptions, and status.Observed from the same; a spec that says nothing must reach
the planners as the planners' defaults, and the CRD the API server applies must say the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_operator.api import GatingSpec, MoEDeploymentSpec, RebalancingSpec
from moe_operator.planning.detection import DetectionPolicy
from moe_operator.planning.gating import GatingOptions
from moe_operator.rebalance import detection_policy, gating_options
from moe_operator.status import Observed

CRD = Path(__file__).resolve().parents[2] / "crds" / "moedeployments.moe-ep.io.yaml"


def test_an_empty_spec_reaches_the_planners_as_their_own_defaults() -> None:
    spec = MoEDeploymentSpec()
    assert gating_options(spec) == GatingOptions()
    assert detection_policy(spec) == DetectionPolicy()


def test_status_judges_with_the_same_defaults() -> None:
    observed = Observed(generation=1, workers=1)
    assert observed.imbalance_threshold == RebalancingSpec().imbalance_threshold
    assert observed.max_rerouted_fraction == GatingSpec().max_rerouted_fraction


def _rebalancing_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["rebalancing"]["properties"]


def test_the_crd_applies_the_same_defaults() -> None:
    """What the API server fills in for a field left out (the operator never sees it empty)."""
    rebalancing, policy, gating = _rebalancing_schema(), DetectionPolicy(), GatingOptions()
    assert rebalancing["imbalanceThreshold"]["default"] == policy.threshold
    assert rebalancing["consecutiveEvaluations"]["default"] == policy.consecutive
    assert rebalancing["cooldownSeconds"]["default"] == policy.cooldown_seconds
    fields = rebalancing["gating"]["properties"]
    assert {key: value["default"] for key, value in fields.items()} == {
        "maxMargin": gating.max_margin,
        "maxReroutedFraction": gating.max_rerouted_fraction,
        "rate": gating.rate,
        "maxBias": gating.max_bias,
        "damping": gating.damping,
    }
