"""Generate the MoEDeployment CustomResourceDefinition from the pydantic models in `api.py`.

Pure: turns pydantic's JSON Schema into a Kubernetes structural schema (no $ref, no anyOf null,
`type` on every node, a default of `{}` on optional objects so the API server cascades nested
defaults). `python -m moe_operator.crd > crds/moedeployments.moe-ep.io.yaml` regenerates the file;
a test proves the committed file is exactly this output.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from moe_operator import api

_KEPT_KEYWORDS = ("type", "description", "enum", "minimum", "maximum", "minLength", "maxLength")
SCALE = {
    "specReplicasPath": ".spec.replicas",
    "statusReplicasPath": ".status.replicas",
    "labelSelectorPath": ".status.labelSelector",
}
"""The scale subresource: kubectl scale and a HorizontalPodAutoscaler set spec.replicas (groups)."""
_PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.ready",
        "description": "Ready worker pods / worker pods wanted.",
    },
    {
        "name": "Groups",
        "type": "integer",
        "jsonPath": ".status.readyReplicas",
        "description": "Replica groups whose whole gang serves.",
    },
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Lifecycle phase.",
    },
    {
        "name": "Imbalance",
        "type": "string",
        "jsonPath": ".status.imbalance",
        "description": "Worst-layer max/mean rank load in the last window.",
    },
    {
        "name": "Plan",
        "type": "integer",
        "jsonPath": ".status.plan.version",
        "description": "Desired plan version.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.endpoint",
        "description": "The OpenAI-compatible API's base URL.",
        "priority": 1,  # kubectl get -o wide
    },
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node -> one structural OpenAPI v3 node (recursively)."""
    description = node.get("description")
    default = node.get("default")
    if "anyOf" in node:  # Optional[X]: the API omits the field instead of sending null
        non_null = [option for option in node["anyOf"] if option.get("type") != "null"]
        node = {**_resolve(non_null[0], defs), **{k: v for k, v in node.items() if k != "anyOf"}}
    node = {**_resolve(node, defs), **{k: v for k, v in node.items() if k != "$ref"}}
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    out = {key: node[key] for key in _KEPT_KEYWORDS if key in node}
    if description:
        out["description"] = description
    if node.get("exclusiveMinimum") is not None:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if node.get("type") == "object" and "properties" in node:
        out["type"] = "object"
        out["properties"] = {
            name: _structural(child, defs) for name, child in node["properties"].items()
        }
        required = [name for name in node.get("required", []) if name in out["properties"]]
        if required:
            out["required"] = required
        for name in required:  # the user gives it: a default would only hide its absence
            out["properties"][name].pop("default", None)
        if node.get("additionalProperties") is True:
            # A model that takes fields it does not list (a core/v1 volume source of any kind):
            # the listed ones are checked, the others kept as written. Only there.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "object" and node.get("additionalProperties") is True:
        # A Kubernetes type kept as written (an Affinity, a TopologySpreadConstraint): the
        # operator checks what it relies on; the API server checks the rest in the pods.
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "object":
        value_schema = node.get("additionalProperties") or {"type": "string"}
        out["additionalProperties"] = _structural(value_schema, defs)
    elif node.get("type") == "array":
        out["items"] = _structural(node["items"], defs)
        out["items"].setdefault("description", f"One item. {description or ''}".strip())
    if default == "":
        pass  # absent means empty, and the 1.20 API server refuses an empty-string default
    elif default is not None:
        out["default"] = default
    elif out.get("type") == "object" and "required" not in out:
        out["default"] = {}  # lets the API server cascade the defaults of nested fields
    elif out.get("type") == "array":
        out["default"] = []
    return out


def _without_defaults(node: dict[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in node.items() if key != "default"}
    if "properties" in out:
        out["properties"] = {
            name: _without_defaults(child) for name, child in out["properties"].items()
        }
    if "items" in out:
        out["items"] = _without_defaults(out["items"])
    return out


def _schema_of(model: type[api.ApiModel]) -> dict[str, Any]:
    json_schema = model.model_json_schema(by_alias=True, mode="serialization")
    return _structural(json_schema, json_schema.get("$defs", {}))


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a plain dict."""
    spec_schema = _schema_of(api.MoEDeploymentSpec)
    # Written, not defaulted. No x-kubernetes-preserve-unknown-fields here: the API server then
    # publishes no properties for kubectl explain, and kopf keeps its notes in annotations.
    status_schema = _without_defaults(_schema_of(api.MoEDeploymentStatus))
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["moe-ep"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, "scale": SCALE},
                    "additionalPrinterColumns": _PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": api.MoEDeploymentSpec.__doc__,
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},  # 1.20 forbids more here
                                "spec": {**spec_schema, "description": "Desired state."},
                                "status": {**status_schema, "description": "Observed state."},
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated by `python -m moe_operator.crd` from moe_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render_crd_yaml())
