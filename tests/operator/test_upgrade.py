"""An operator upgrade keeps a running single-group deployment's pods (issue 23): group 0 is
built exactly as the operator before replica groups built the deployment's StatefulSet (name,
selector, pod template), so the upgraded operator finds it current and neither restarts nor
surges it. Only the PodDisruptionBudget's selector gains the group label, which the operator
puts on the pods (a PodDisruptionBudget's selector may change; a StatefulSet's may not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moe_operator.groups.naming import DRAIN_ANNOTATION, GROUP_LABEL
from moe_operator.kube import contains
from moe_operator.manifests import children
from moe_operator.validation import parse_spec

BEFORE = json.loads(
    (Path(__file__).parents[1] / "fixtures/upgrade/single-group-children.json").read_text()
)


def _stored(obj: Any) -> Any:
    """As the API server keeps it: null fields dropped."""
    if isinstance(obj, dict):
        return {key: _stored(value) for key, value in obj.items() if value is not None}
    if isinstance(obj, list):
        return [_stored(item) for item in obj]
    return obj


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_group_0_is_the_statefulset_a_single_group_deployment_had(case: str) -> None:
    old: dict[str, Any] = BEFORE[case]
    spec, problems = parse_spec(old["spec"], name="golden")
    assert spec is not None, problems
    assert children.build_statefulset("golden", "ns", spec, 0) == old["statefulset"]
    stored = _stored(old["statefulset"])  # what the upgraded operator reads: current
    assert contains(stored, children.build_statefulset("golden", "ns", spec, 0))
    assert not contains(stored, children.build_statefulset("golden", "ns", spec, 1))
    # As the operator sends it: the drain mark removed, on an object that has no annotations.
    sent = children.build_statefulset("golden", "ns", spec, 0)
    sent["metadata"]["annotations"] = {DRAIN_ANNOTATION: None}
    assert "annotations" not in stored["metadata"] and contains(stored, sent)
    sent["metadata"]["annotations"] = {DRAIN_ANNOTATION: "2026-12-07T00:00:00Z"}
    assert not contains(stored, sent)
    pdb = children.build_pdb("golden", spec, "policy/v1", 0)
    assert pdb["metadata"]["name"] == old["pdb"]["metadata"]["name"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == {**old["pdb"]["spec"]["selector"]["matchLabels"], GROUP_LABEL: "0"}
