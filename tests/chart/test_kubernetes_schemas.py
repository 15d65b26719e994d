"""Every object we ship or print, checked against Kubernetes' own schemas (kubernetes-validate).

- the chart, rendered by Helm's engine with its defaults and with each values file in values/;
- the CRD, as an apiextensions.k8s.io/v1 CustomResourceDefinition;
- what `moe-ep render` prints for every sample in manifests/samples/ (the operator's builders),
  with the PodDisruptionBudget at the apiVersion each release serves.

Versions: the local cluster's 1.20, 1.28, and 1.30. kubernetes-validate ships its schemas in
the package (no network), but a release ships about nine minor versions and none holds both 1.20
and 1.30: the `test` extra's 1.28.0 holds 1.20 to 1.28, and `make setup` installs 1.31.0 (1.22
to 1.31) apart, in `.venv/kubernetes-validate-1.31`, which a subprocess runs for 1.30.
Strict mode: a field the schema does not know is an error, as the API server's field validation
is from 1.27. Custom resources (PodMonitor, ServiceMonitor, PrometheusRule) have no built-in
schema and are skipped, by name.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_operator.cli import render as render_cli
from tests.chart.conftest import CHART_DIR, ROOT, Render
from tests.requirements import missing, require_module

with warnings.catch_warnings():  # 1.28.0 imports pkg_resources, deprecated by setuptools
    warnings.simplefilter("ignore")
    kubernetes_validate = require_module("kubernetes_validate")

# kubernetes-validate 1.28.0 warns about its own use of jsonschema and pkg_resources.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

VERSIONS = ("1.20.0", "1.28.0", "1.30.0")
# kubernetes-validate 1.31.0 and its dependencies, installed apart by `make setup`.
SIDE_INSTALL = {"1.30.0": Path(sys.prefix) / "kubernetes-validate-1.31"}
_SIDE_VALIDATOR = """
import json, sys, warnings
warnings.simplefilter("ignore")
import kubernetes_validate as kv
problems = []
for obj in json.load(sys.stdin):
    where = f"{obj['kind']} {obj['metadata'].get('name')} @ {sys.argv[1]}"
    try:
        kv.validate(obj, sys.argv[1], strict=True)
    except kv.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        problems.append(f"{where}: {path}: {error.message}")
    except kv.SchemaNotFoundError as error:
        problems.append(f"{where}: {error}")
print(json.dumps(problems))
"""
CUSTOM_RESOURCES = {
    "PodMonitor": "monitoring.coreos.com/v1, the Prometheus Operator's CRD",
    "ServiceMonitor": "monitoring.coreos.com/v1, the Prometheus Operator's CRD",
    "PrometheusRule": "monitoring.coreos.com/v1, the Prometheus Operator's CRD",
}
VALUES_FILES = sorted((Path(__file__).parent / "values").glob("*.yaml"))
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def problems_of(obj: dict[str, Any], version: str) -> list[str]:
    """Schema errors of one object (empty: valid), each with the object's kind and name."""
    return all_problems([obj], version)


def all_problems(objects: list[dict[str, Any]], version: str) -> list[str]:
    """Schema errors of every object, by the release of kubernetes-validate holding `version`."""
    if version in SIDE_INSTALL:
        return _side_problems(objects, version)
    return [problem for obj in objects for problem in _problems(obj, version)]


def _side_problems(objects: list[dict[str, Any]], version: str) -> list[str]:
    """One subprocess validates them all with the separately installed release."""
    side = SIDE_INSTALL[version]
    if not (side / "kubernetes_validate").is_dir():
        missing(f"kubernetes-validate 1.31.0 is not installed in {side} (`make setup` does it)")
    answer = subprocess.run(
        [sys.executable, "-c", _SIDE_VALIDATOR, version],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(side)},
        timeout=300,
        check=True,
    )
    return json.loads(answer.stdout)


def _problems(obj: dict[str, Any], version: str) -> list[str]:
    where = f"{obj['kind']} {obj['metadata'].get('name')} @ {version}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        return [f"{where}: {path}: {error.message}"]
    return []


def checked(objects: list[dict[str, Any]], version: str) -> tuple[list[str], list[str]]:
    """(problems, kinds checked); custom resources are skipped."""
    built_in = [obj for obj in objects if obj["kind"] not in CUSTOM_RESOURCES]
    return all_problems(built_in, version), [obj["kind"] for obj in built_in]


def test_the_validator_catches_what_the_api_server_refuses() -> None:
    """Offline, strict, and able to fail: otherwise every test below proves nothing."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
               "spec": {"ports": [{"port": 80, "protcol": "TCP"}]}}  # fmt: skip
    for version in VERSIONS:
        assert problems_of(service, version), version
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "p"},
           "spec": {"minAvailable": 2}}  # fmt: skip
    assert problems_of(pdb, "1.28.0") == problems_of(pdb, "1.30.0") == []
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(pdb, "1.20.0", strict=True)  # policy/v1 is 1.21's


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=["defaults", *(p.stem for p in VALUES_FILES)]
)
def test_every_chart_object_is_valid(
    render: Render, values_file: Path | None, version: str
) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    problems, kinds = checked(render(values), version)
    assert problems == []
    assert "Deployment" in kinds


def test_values_files_cover_the_monitoring_objects(render: Render) -> None:
    """The custom resources skipped above are rendered by some values file (so the rest of
    that rendering was checked with them present)."""
    rendered = {
        obj["kind"] for path in VALUES_FILES for obj in render(yaml.safe_load(path.read_text()))
    }
    assert set(CUSTOM_RESOURCES) <= rendered


@pytest.mark.parametrize("version", VERSIONS)
def test_the_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    for path in (ROOT / "crds" / "moedeployments.moe-ep.io.yaml", CHART_DIR / "crds" / (
        "moedeployments.moe-ep.io.yaml"
    )):  # fmt: skip
        assert problems_of(yaml.safe_load(path.read_text()), version) == []


def rendered_sample(path: Path, version: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = render_cli.main(["-f", str(path), "--kubernetes-version", version])
    assert code == 0, f"moe-ep render -f {path.name} exited {code}"
    return [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sample", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_moe_ep_render_of_every_sample_is_valid(sample: Path, version: str) -> None:
    objects = rendered_sample(sample, version)
    problems, kinds = checked(objects, version)
    assert problems == []
    assert sorted(kinds) == sorted(
        ["Secret", "ConfigMap", "Service", "Service", "StatefulSet", "PodDisruptionBudget"]
    )
    pdb = next(obj for obj in objects if obj["kind"] == "PodDisruptionBudget")
    assert pdb["apiVersion"] == ("policy/v1beta1" if version.startswith("1.20") else "policy/v1")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_new_pod_field_at_once_is_valid(tmp_path: Path, version: str) -> None:
    """The NCCL, RDMA, scheduling and gang fields together, as the GPU walk-through sets them."""
    document = yaml.safe_load((ROOT / "manifests" / "samples" / "seed-ep16.yaml").read_text())
    gpu_nodes = {"key": "nvidia.com/gpu.count", "operator": "In", "values": ["8"]}
    required = {"nodeSelectorTerms": [{"matchExpressions": [gpu_nodes]}]}
    spread = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
    }
    document["spec"]["worker"].update(
        {
            "gpuResourceName": "nvidia.com/gpu",
            "extraResources": {"rdma/ib": "1"},
            "shm": {"sizeLimit": "64Gi"},
            "network": {"socketInterface": "eth0", "hostNetwork": True, "ipcLock": True},
            "security": {"runAsUser": 1000, "runAsGroup": 1000},
            "scheduling": {
                "affinity": {
                    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
                },
                "topologySpreadConstraints": [spread],
                "priorityClassName": "inference",
                "gang": {"scheduler": "Volcano", "queueName": "gpu"},
                "podLabels": {"example.com/team": "ml"},
                "podAnnotations": {"example.com/owner": "ml-platform"},
            },
        }
    )
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(document))
    objects = rendered_sample(path, version)
    assert checked(objects, version)[0] == []
    pod = next(obj for obj in objects if obj["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["schedulerName"] == "volcano"


def walkthrough_deployment() -> str:
    """The MoEDeployment of docs/gpu-cluster.md's walk-through, as the reader copies it."""
    text = (ROOT / "docs" / "gpu-cluster.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]
    found = [block for block in blocks if "kind: MoEDeployment" in block]
    assert len(found) == 1, "docs/gpu-cluster.md: expected one MoEDeployment block"
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_gpu_walkthrough_deployment_renders_valid_objects(tmp_path: Path, version: str) -> None:
    path = tmp_path / "seed-ep16-2x8.yaml"
    path.write_text(walkthrough_deployment())
    objects = rendered_sample(path, version)
    assert checked(objects, version)[0] == []
    pod = next(obj for obj in objects if obj["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["rdma/ib"] == "1"
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in container["env"]


AUTOSCALING = ROOT / "manifests" / "samples" / "autoscaling"


def _worker_metric_names() -> set[str]:
    from moe_worker.metrics import WorkerMetrics

    registry = WorkerMetrics(lambda: None, lambda: None).registry  # type: ignore[arg-type,return-value]
    return {metric.name for metric in registry.collect()}


def _autoscaler_target(document: dict[str, Any]) -> dict[str, Any]:
    """The MoEDeployment sample an autoscaler sample scales (by name)."""
    target = document["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("moe-ep.io/v1alpha1", "MoEDeployment")
    samples = {yaml.safe_load(p.read_text())["metadata"]["name"]: p for p in SAMPLES}
    return yaml.safe_load(samples[target["name"]].read_text())


@pytest.mark.parametrize("version", ["1.28.0", "1.30.0"])  # autoscaling/v2: from 1.23
def test_the_sample_hpa_is_valid_and_scales_a_sample_on_a_worker_metric(version: str) -> None:
    hpa = yaml.safe_load((AUTOSCALING / "hpa.yaml").read_text())
    assert problems_of(hpa, version) == []
    _autoscaler_target(hpa)
    exported = _worker_metric_names()
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported


def test_the_sample_keda_scaled_object_queries_a_worker_metric_of_the_sample() -> None:
    """A custom resource (no built-in schema): its target, its Prometheus query's metric and
    the pods it names (the sample's group leaders) are checked instead."""
    scaled = yaml.safe_load((AUTOSCALING / "keda-scaledobject.yaml").read_text())
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    name = _autoscaler_target(scaled)["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    exported = _worker_metric_names()
    assert query.split("(", 1)[1].split("{", 1)[0] in exported
    assert f'pod=~"{name}(-g[0-9]+)?-0"' in query  # group 0's leader and group k's
    assert float(trigger["metadata"]["threshold"]) > 0


@pytest.mark.parametrize("version", VERSIONS)
def test_the_router_objects_are_valid(version: str) -> None:
    from moe_operator.manifests import router
    from moe_operator.validation import parse_spec

    spec, problems = parse_spec({"replicas": 2}, name="m")
    assert spec is not None, problems
    pdb_version = "policy/v1beta1" if version.startswith("1.20") else "policy/v1"
    objects = [
        router.build_service_account("m"),
        router.build_role("m"),
        router.build_role_binding("m"),
        router.build_deployment("m", "ns", spec, router.DEFAULT_ROUTER_IMAGE),
        router.build_pdb("m", pdb_version),
    ]
    assert checked(objects, version)[0] == []
