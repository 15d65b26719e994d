"""The operator against a real API server, running with its own ServiceAccount's credentials.

Proves: the RBAC in manifests/ is sufficient; the sample becomes a StatefulSet whose 16 Pods the
controller-manager creates; status and printer columns are filled; bad objects are refused by
the schema or flagged SpecValid=False naming the field; fixing recovers; deletion cascades.
"""

from __future__ import annotations

import base64
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.kubectl import Kubectl, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "moe-ep-system"
NS = "it-operator"
SMALL = yaml.safe_load((ROOT / "manifests/samples/cpu-small.yaml").read_text())


@pytest.fixture(scope="module")
def kubectl(kube_admin_kubeconfig: str) -> Kubectl:
    return Kubectl(kube_admin_kubeconfig)


@pytest.fixture(scope="module")
def operator(
    control_plane: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[str]]:
    kubectl.run("create", "namespace", SYSTEM, check=False)
    kubectl.run("create", "namespace", NS, check=False)
    kubectl.run("apply", "-n", SYSTEM, "-f", str(ROOT / "manifests/rbac.yaml"))
    sa_kubeconfig = control_plane.make_service_account_kubeconfig(SYSTEM, "moe-ep-operator")
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(sa_kubeconfig), "MOE_OPERATOR_TIMER_SECONDS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moe_operator.main",
                "--liveness-port",
                "0",
                "--metrics-port",
                "0",
                "--bind-address",
                "127.0.0.1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    process.log_path = log  # type: ignore[attr-defined]
    yield process
    process.terminate()
    process.wait(timeout=30)


def _apply(
    kubectl: Kubectl, document: dict[str, Any], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return kubectl.run("apply", "-n", NS, "-f", "-", stdin=yaml.safe_dump(document), check=check)


def _status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    obj = kubectl.get("moed", name, "-n", NS) or {}
    return obj.get("status") or {}


def _condition(kubectl: Kubectl, name: str, kind: str) -> dict[str, Any] | None:
    for condition in _status(kubectl, name).get("conditions") or []:
        if condition["type"] == kind:
            return condition
    return None


def test_seed_sample_becomes_children_with_status(kubectl: Kubectl, operator: Any) -> None:
    seed = yaml.safe_load((ROOT / "manifests/samples/seed-ep16.yaml").read_text())
    _apply(kubectl, seed)
    sts = wait_for(lambda: kubectl.get("statefulset", "seed-ep16", "-n", NS), 60, "StatefulSet")
    assert sts["spec"]["replicas"] == 16 and sts["spec"]["podManagementPolicy"] == "Parallel"
    owner = sts["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "MoEDeployment" and owner["name"] == "seed-ep16"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The sample names no image: the operator's default CUDA worker, the one the chart names.
    assert container["image"] == "ghcr.io/moe-ep/moe-ep-worker:0.1.0-cuda"
    service = kubectl.get("service", "seed-ep16-workers", "-n", NS)
    assert service and service["spec"]["clusterIP"] == "None"
    configmap = kubectl.get("configmap", "seed-ep16-plan", "-n", NS)
    assert configmap
    plan = yaml.safe_load(configmap["data"]["plan.json"])
    assert plan["version"] == 1 and plan["slots"][3] == [[e] for e in range(16)]
    secret = kubectl.get("secret", "seed-ep16-control", "-n", NS)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32
    pods = wait_for(
        lambda: (
            [
                p
                for p in (
                    kubectl.get("pods", "-n", NS, "-l", "moe-ep.io/deployment=seed-ep16")
                    or {"items": []}
                )["items"]
            ]
            if len(
                (
                    kubectl.get("pods", "-n", NS, "-l", "moe-ep.io/deployment=seed-ep16")
                    or {"items": []}
                )["items"]
            )
            == 16
            else None
        ),
        60,
        "16 pods",
    )
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(
        f"seed-ep16-{i}" for i in range(16)
    )
    status = wait_for(
        lambda: (
            _status(kubectl, "seed-ep16").get("observedGeneration")
            and _status(kubectl, "seed-ep16")
        ),
        30,
        "status",
    )
    assert status["phase"] == "Deploying" and status["workers"] == 16
    assert status["plan"]["version"] == 1
    table = kubectl.run("get", "moed", "seed-ep16", "-n", NS).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "PHASE", "IMBALANCE", "PLAN", "AGE"]
    assert row.split()[1:5] == ["0/16", "Deploying", "-", "1"]
    assert token not in Path(operator.log_path).read_text()


def _small(name: str, **changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(SMALL)
    document["metadata"]["name"] = name
    for path, value in changes.items():
        node = document["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return document


SCHEMA_REJECTED = [
    ("model__layers", 0, "spec.model.layers"),
    ("model__dtype", "int8", "spec.model.dtype"),
    ("rebalancing__method", "Magic", "spec.rebalancing.method"),
    ("parallelism__expert", "four", "spec.parallelism.expert"),
    ("worker__backend", "mpi", "spec.worker.backend"),
    ("rebalancing__imbalanceThreshold", 0.5, "spec.rebalancing.imbalanceThreshold"),
    ("metrics__source", "Graphite", "spec.metrics.source"),
    ("worker__extraEnv", [{"value": "x"}], "spec.worker.extraEnv"),
]


@pytest.mark.parametrize(
    ("path", "value", "field"), SCHEMA_REJECTED, ids=[case[0] for case in SCHEMA_REJECTED]
)
def test_schema_refuses_bad_objects_naming_the_field(
    kubectl: Kubectl, operator: Any, path: str, value: Any, field: str
) -> None:
    result = _apply(kubectl, _small("bad-schema", **{path: value}), check=False)
    assert result.returncode != 0 and field in result.stderr, result.stderr


CROSS_FIELD = [
    ("model__topK", 9, "spec.model.topK"),
    ("parallelism__expert", 2, "spec.placement.slotsPerRank"),
    ("worker__backend", "nccl", "spec.worker.backend"),
    ("parallelism__tensor", 2, "spec.parallelism"),
    ("metrics__source", "Prometheus", "spec.metrics.prometheusUrl"),
    ("worker__extraEnv", [{"name": "MOE_RANK", "value": "1"}], "spec.worker.extraEnv"),
]


@pytest.mark.parametrize(
    ("path", "value", "field"), CROSS_FIELD, ids=[case[0] for case in CROSS_FIELD]
)
def test_cross_field_problems_are_flagged_and_nothing_is_created(
    kubectl: Kubectl, operator: Any, path: str, value: Any, field: str
) -> None:
    name = "bad-" + path.split("__")[-1].lower()
    _apply(kubectl, _small(name, **{path: value}))
    condition = wait_for(lambda: _condition(kubectl, name, "SpecValid"), 30, "SpecValid")
    assert condition["status"] == "False" and field in condition["message"]
    assert _status(kubectl, name)["phase"] == "Failed"
    assert kubectl.get("statefulset", name, "-n", NS) is None
    assert kubectl.get("configmap", f"{name}-plan", "-n", NS) is None
    assert operator.poll() is None  # the operator is still running


def test_fixing_a_bad_object_recovers_without_manual_steps(kubectl: Kubectl, operator: Any) -> None:
    _apply(kubectl, _small("fixme", model__topK=9))
    wait_for(
        lambda: (_condition(kubectl, "fixme", "SpecValid") or {}).get("status") == "False",
        30,
        "SpecValid=False",
    )
    _apply(kubectl, _small("fixme"))
    wait_for(
        lambda: (_condition(kubectl, "fixme", "SpecValid") or {}).get("status") == "True",
        30,
        "SpecValid=True",
    )
    assert wait_for(lambda: kubectl.get("statefulset", "fixme", "-n", NS), 30, "StatefulSet")
    assert wait_for(lambda: _status(kubectl, "fixme").get("phase") == "Deploying", 30, "phase")


def test_a_bad_object_does_not_disturb_a_good_one(kubectl: Kubectl, operator: Any) -> None:
    _apply(kubectl, _small("good-neighbour"))
    _apply(kubectl, _small("bad-neighbour", model__topK=9))
    assert wait_for(lambda: kubectl.get("statefulset", "good-neighbour", "-n", NS), 30, "sts")
    image = "example.org/worker:2"
    _apply(kubectl, _small("good-neighbour", worker__image=image))
    wait_for(
        lambda: (
            kubectl.get("statefulset", "good-neighbour", "-n", NS)["spec"]["template"]["spec"][
                "containers"
            ][0]["image"]
            == image
        ),
        30,
        "update applied",
    )


def test_deleting_removes_every_child(kubectl: Kubectl, operator: Any) -> None:
    _apply(kubectl, _small("short-lived"))
    wait_for(lambda: kubectl.get("statefulset", "short-lived", "-n", NS), 30, "StatefulSet")
    kubectl.run("delete", "moed", "short-lived", "-n", NS, "--wait=true", "--timeout=30s")
    for kind, name in [
        ("statefulset", "short-lived"),
        ("service", "short-lived-workers"),
        ("configmap", "short-lived-plan"),
        ("secret", "short-lived-control"),
    ]:
        wait_for(
            lambda kind=kind, name=name: kubectl.get(kind, name, "-n", NS) is None,
            60,
            f"{kind} {name} deleted",
        )
    wait_for(
        lambda: (
            not (
                kubectl.get("pods", "-n", NS, "-l", "moe-ep.io/deployment=short-lived")
                or {"items": []}
            )["items"]
        ),
        60,
        "pods deleted",
    )
