"""The CRD YAML and the pydantic models are one API: prove they cannot drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_contract.shape import ARCHITECTURES
from moe_operator import api, crd

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "moedeployments.moe-ep.io.yaml"


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    return found


def _version_schema() -> dict[str, Any]:
    document = yaml.safe_load(CRD_FILE.read_text())
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_exactly_what_the_models_generate() -> None:
    assert CRD_FILE.read_text() == crd.render_crd_yaml(), (
        "crds/ drifted from api.py: run `python -m moe_operator.crd > " + str(CRD_FILE.name) + "`"
    )


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [
        path
        for path, node in _walk(_version_schema())
        if not node.get("description") and path != ".metadata"
    ]
    assert missing == []


def test_every_structural_node_has_a_type() -> None:
    untyped = [path for path, node in _walk(_version_schema()) if "type" not in node]
    assert untyped == []


def _required(spec: dict[str, Any]) -> set[str]:
    """Paths of fields the user must give when their parent is there (no default then)."""
    return {f"{path}.{name}" for path, node in _walk(spec) for name in node.get("required") or []}


def test_every_optional_spec_field_has_a_default() -> None:
    spec = _version_schema()["properties"]["spec"]
    # Optional strings that default to empty have no default: absent means empty there.
    # Optional objects with required fields (a checkpoint, a volume source) have none either:
    # absent means not given.
    required = _required(spec)
    without = [
        path
        for path, node in _walk(spec)
        if path
        and "[]" not in path
        and "default" not in node
        and node.get("type") != "string"
        and path not in required
        and "required" not in node
    ]
    assert without == []


def test_required_fields_have_no_default() -> None:
    spec = _version_schema()["properties"]["spec"]
    nodes = dict(_walk(spec))
    assert [path for path in _required(spec) if "default" in nodes[path]] == []


def test_only_the_volume_source_and_scheduling_types_keep_unknown_fields() -> None:
    """Structural everywhere else: the API server prunes what the schema does not list. The
    exceptions are core/v1 types passed to the pods as written (the API server checks them
    there): a volume source, an Affinity, TopologySpreadConstraints."""
    kept = [
        path
        for path, node in _walk(_version_schema())
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert kept == [
        ".spec.model.source.checkpoint.volume",
        ".spec.worker.scheduling.affinity",
        ".spec.worker.scheduling.topologySpreadConstraints[]",
    ]


def _model_defaults(model: type[api.ApiModel]) -> dict[str, Any]:
    return model().model_dump(by_alias=True, mode="json", exclude_none=True)


def _schema_defaults(properties: dict[str, Any]) -> dict[str, Any]:
    """What the API server fills in: defaults, cascading into objects that default to {}."""
    out = {}
    for name, node in properties.items():
        if node.get("type") == "object" and "properties" in node:
            if node.get("default") == {}:
                out[name] = _schema_defaults(node["properties"])
            continue  # an optional object: absent unless given
        out[name] = node.get("default", "")
    return out


@pytest.mark.parametrize(
    ("section", "model"),
    [
        ("model", api.ModelSpec),
        ("parallelism", api.ParallelismSpec),
        ("placement", api.PlacementSpec),
        ("rebalancing", api.RebalancingSpec),
        ("worker", api.WorkerSpec),
        ("metrics", api.MetricsSpec),
    ],
)
def test_schema_defaults_equal_model_defaults(section: str, model: type[api.ApiModel]) -> None:
    properties = _version_schema()["properties"]["spec"]["properties"][section]["properties"]
    assert _schema_defaults(properties) == _model_defaults(model)


def test_architectures_are_the_workers() -> None:
    model = _version_schema()["properties"]["spec"]["properties"]["model"]["properties"]
    assert tuple(model["architecture"]["enum"]) == ARCHITECTURES


def test_schema_fields_are_exactly_the_model_fields() -> None:
    spec = _version_schema()["properties"]["spec"]["properties"]
    assert set(spec) == {field.alias for field in api.MoEDeploymentSpec.model_fields.values()}
    for section, field in api.MoEDeploymentSpec.model_fields.items():
        alias = field.alias or section
        submodel = field.annotation
        if not isinstance(submodel, type) or not issubclass(submodel, api.ApiModel):
            assert spec[alias]["type"] == "integer", alias  # replicas
            continue
        assert set(spec[alias]["properties"]) == {
            sub.alias or name
            for name, sub in submodel.model_fields.items()  # type: ignore[union-attr]
        }


def test_seed_defaults_are_the_reference_workload() -> None:
    spec = api.MoEDeploymentSpec()
    assert (
        spec.model.layers,
        spec.model.experts_per_layer,
        spec.model.hidden_size,
        spec.model.ffn_hidden_size,
        spec.model.attention_heads,
        spec.model.head_dim,
        spec.model.top_k,
        spec.model.dtype,
    ) == (16, 16, 4096, 16384, 32, 128, 2, "bfloat16")
    assert spec.parallelism.world_size == 16


def test_ranges_and_enums_reach_the_schema() -> None:
    model = _version_schema()["properties"]["spec"]["properties"]["model"]["properties"]
    assert model["topK"]["minimum"] == 1
    assert model["dtype"]["enum"] == ["bfloat16", "float16", "float32"]
    rebalancing = _version_schema()["properties"]["spec"]["properties"]["rebalancing"]
    assert rebalancing["properties"]["method"]["enum"] == ["Auto", "Replace", "GatingBias"]


def test_names_printer_columns_and_status_subresource() -> None:
    document = yaml.safe_load(CRD_FILE.read_text())
    assert document["spec"]["names"]["shortNames"] == ["moed"]
    version = document["spec"]["versions"][0]
    # kubectl scale and a HorizontalPodAutoscaler set spec.replicas (groups)
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.labelSelector",
        },
    }
    assert [column["name"] for column in version["additionalPrinterColumns"]] == [
        "Ready",
        "Groups",
        "Phase",
        "Imbalance",
        "Plan",
        "Age",
        "Endpoint",
    ]
