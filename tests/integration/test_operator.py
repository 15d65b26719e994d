"""The operator against a real API server, running with its own ServiceAccount's credentials.

Proves: the RBAC in manifests/ is sufficient; the sample becomes a StatefulSet whose 2 Pods (8
ranks each) the controller-manager creates; status and printer columns are filled; bad objects
are refused by the schema or flagged SpecValid=False naming the field; fixing recovers;
deletion cascades.
Issue 11 where the real server's behaviour matters: the status schema is published; what the
operator's validation refuses agrees with what the API server would refuse in the children; a
plan version the CRD's int64 cannot hold never blocks status; a template change replaces the
StatefulSet's pods once (OnDelete, the real controller), with the chart's RBAC. An older
operator's version copies in status survive the schema until the operator removes them.
Issue 23: `kubectl scale` through the scale subresource adds and removes a replica group, and an
HPA aimed at a MoEDeployment is accepted.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_operator.api import MoEDeploymentSpec
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.manifests import children
from moe_operator.validation import parse_spec
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
    # EP16 as 2 pods of 8 GPUs, one rank per GPU.
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    owner = sts["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "MoEDeployment" and owner["name"] == "seed-ep16"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The sample names no image: the operator's default CUDA worker, the one the chart names.
    assert container["image"] == "ghcr.io/moe-ep/moe-ep-worker:0.1.0-cuda"
    service = kubectl.get("service", "seed-ep16-workers", "-n", NS)
    assert service and service["spec"]["clusterIP"] == "None"
    configmap = kubectl.get("configmap", "seed-ep16-plan", "-n", NS)
    assert configmap
    plan = yaml.safe_load(configmap["data"]["plan-L16-E16-R16-S1.json"])
    assert plan["version"] == 1 and plan["slots"][3] == [[e] for e in range(16)]
    secret = kubectl.get("secret", "seed-ep16-control", "-n", NS)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32
    # The gang's budget, at the version this 1.20 API server serves (found by discovery).
    pdb = kubectl.get("poddisruptionbudget", "seed-ep16", "-n", NS)
    assert pdb and pdb["apiVersion"] == "policy/v1beta1"
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["metadata"]["ownerReferences"][0]["name"] == "seed-ep16"
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
            == 2
            else None
        ),
        60,
        "2 pods",
    )
    assert sorted(p["metadata"]["name"] for p in pods) == ["seed-ep16-0", "seed-ep16-1"]
    status = wait_for(
        lambda: (
            _status(kubectl, "seed-ep16").get("observedGeneration")
            and _status(kubectl, "seed-ep16")
        ),
        30,
        "status",
    )
    assert status["phase"] == "Deploying" and status["workers"] == 2  # pods
    assert status["plan"]["version"] == 1
    table = kubectl.run("get", "moed", "seed-ep16", "-n", NS).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "GROUPS", "PHASE", "IMBALANCE", "PLAN", "AGE"]
    assert row.split()[1:6] == ["0/2", "0", "Deploying", "-", "1"]
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

    def images() -> set[str]:
        found = kubectl.get(
            "statefulsets", "-n", NS, "-l", "moe-ep.io/deployment=good-neighbour"
        ) or {"items": []}
        return {s["spec"]["template"]["spec"]["containers"][0]["image"] for s in found["items"]}

    # A surge: group 1 starts on the new template; group 0, which serves nothing (no node runs
    # pods here), goes at once.
    wait_for(lambda: images() == {image}, 30, "update applied")


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


# --- issue 11 ---------------------------------------------------------------------------------


def test_status_fields_are_published(kubectl: Kubectl) -> None:
    """`kubectl explain` reads the API server's published schema: status must be in it."""
    status = kubectl.run("explain", "moed.status").stdout
    for field in ("conditions", "plan", "phase", "observedGeneration", "lastRebalance"):
        assert field in status, status
    plan = kubectl.run("explain", "moed.status.plan").stdout
    for field in ("appliedVersion", "digest", "configMapKey"):
        assert field in plan, plan


IN_PLACE = {"maxSurge": 0, "maxUnavailable": 1}  # no surge: one group restarts in place

# (spec changes, name, whether the operator's validation must accept). The server's verdict on the
# children built from the same spec must never be "refused" where ours is "accepted".
RULE_CASES = [
    ({}, "rules-ok", True),
    ({}, "with.dots", False),
    ({}, "a" * 53, False),
    ({"updateStrategy": IN_PLACE}, "a" * 52, True),  # one group only: <name>-<rank> pods
    ({}, "a" * 52, False),  # a second group, <name>-g<k>, may exist during an update
    ({}, "a" * 48, True),
    ({}, "a" * 49, False),
    ({"worker__extraEnv": [{"name": "MY VAR", "value": "1"}]}, "rules-env", False),
    ({"worker__extraEnv": [{"name": "MY-VAR.x", "value": "1"}]}, "rules-envok", True),
    ({"worker__extraEnv": [{"name": "1VAR", "value": "1"}]}, "rules-env1", False),
    ({"worker__nodeSelector": {"gpu type": "x"}}, "rules-nodekey", False),
    ({"worker__nodeSelector": {"gpu": "h" * 64}}, "rules-nodeval", False),
    ({"worker__nodeSelector": {"nvidia.com/gpu.product": "H100_SXM"}}, "rules-nodeok", True),
    ({"worker__resources": {"requests": {"memory": "lots"}}}, "rules-qty", False),
    ({"worker__resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}, "rules-lim", False),
    ({"worker__resources": {"requests": {"gpu": "1"}}}, "rules-resname", False),
    ({"worker__resources": {"requests": {"cpu": "250m", "memory": "1.5Gi"}}}, "rules-res", True),
    ({"worker__tolerations": [{"key": "-bad", "operator": "Exists"}]}, "rules-taint", False),
]


def _server_accepts(kubectl: Kubectl, name: str, spec: MoEDeploymentSpec) -> tuple[bool, str]:
    """Dry-run what the children and the StatefulSet controller would create, for the group
    with the longest name that may exist (group 99 where a second group can exist)."""
    several = spec.replicas + spec.update_strategy.max_surge > 1
    statefulset = children.build_statefulset(name, NS, spec, 99 if several else 0)
    group = statefulset["metadata"]["name"]
    template = statefulset["spec"]["template"]
    last = spec.parallelism.world_size - 1
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{group}-{last}",
            "labels": {
                **template["metadata"]["labels"],
                "controller-revision-hash": f"{group}-" + "b" * 10,
                "statefulset.kubernetes.io/pod-name": f"{group}-{last}",
            },
        },
        "spec": {**template["spec"], "hostname": f"{group}-{last}"},
    }
    documents = [children.build_service(name, spec), statefulset, pod]
    stdin = yaml.safe_dump_all(documents)
    result = kubectl.run(
        "create", "--dry-run=server", "-n", NS, "-f", "-", stdin=stdin, check=False
    )
    return result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("changes", "name", "ours"), RULE_CASES, ids=[c[1][:20] for c in RULE_CASES]
)
def test_validation_refuses_what_the_api_server_would(
    kubectl: Kubectl, changes: dict[str, Any], name: str, ours: bool
) -> None:
    raw = _small(name, **changes)["spec"]
    parsed, problems = parse_spec(raw, name=name)
    assert (parsed is not None) == ours, problems
    spec = with_worker_image(MoEDeploymentSpec.model_validate(raw), WorkerImages.from_environ())
    server, why = _server_accepts(kubectl, name, spec)
    assert server == ours, f"the API server says {server}: {why}"


def _configmap_key(kubectl: Kubectl, name: str) -> str:
    sts = kubectl.get("statefulset", name, "-n", NS)
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "plan")
    return volume["configMap"]["items"][0]["key"]


def test_a_plan_version_past_int64_never_blocks_status(kubectl: Kubectl, operator: Any) -> None:
    """Issue 11, item 6: plan version 2^63 in the ConfigMap made every status patch fail (422:
    int64 overflow) and kopf stopped the timer for good. Such a plan is now refused as unreadable,
    the record repaired, and status keeps being written."""
    _apply(kubectl, _small("huge-version"))
    wait_for(lambda: kubectl.get("statefulset", "huge-version", "-n", NS), 30, "StatefulSet")
    key = _configmap_key(kubectl, "huge-version")
    configmap = kubectl.get("configmap", "huge-version-plan", "-n", NS)
    forged = json.loads(configmap["data"][key]) | {"version": 2**63}
    patch = json.dumps({"data": {key: json.dumps(forged)}})
    kubectl.run("patch", "configmap", "huge-version-plan", "-n", NS, "--type=merge", "-p", patch)

    def repaired() -> bool:
        data = kubectl.get("configmap", "huge-version-plan", "-n", NS)["data"][key]
        return json.loads(data)["version"] < 2**53

    wait_for(repaired, 30, "the plan record repaired")
    _apply(kubectl, _small("huge-version", worker__image="example.org/worker:3"))
    wait_for(
        lambda: _status(kubectl, "huge-version").get("observedGeneration") == 2,
        30,
        "status written for the new generation",
    )
    assert _status(kubectl, "huge-version")["plan"]["version"] == 2  # never back, never 2^63
    assert (_condition(kubectl, "huge-version", "Reconciled") or {}).get("status") == "True"
    # The CRD refuses what the old operator wrote: that is why versions are bounded.
    result = kubectl.run(
        "patch", "moed", "huge-version", "-n", NS, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"plan": {"version": 2**63}}}), check=False,
    )  # fmt: skip
    assert result.returncode != 0


def test_an_older_operators_version_copies_are_kept_by_the_schema_then_removed(
    kubectl: Kubectl, operator: Any
) -> None:
    """Operators before the plan-version ledger kept the versions in status.detection too. The
    schema still has those fields, or the API server would prune them before an upgraded
    operator could read them (tests/kmock: it does, the highest copy counting); its status
    writes then remove them, leaving one copy, status.plan."""
    _apply(kubectl, _small("upgraded"))
    wait_for(lambda: _status(kubectl, "upgraded").get("detection"), 30, "detection written")
    older = {"status": {"detection": {"desiredVersion": 5, "appliedVersion": 4}}}
    patched = kubectl.run(
        "patch", "moed", "upgraded", "-n", NS, "--subresource=status", "--type=merge",
        "-p", json.dumps(older), "-o", "json",
    )  # fmt: skip
    kept = json.loads(patched.stdout)["status"]["detection"]
    assert (kept["desiredVersion"], kept["appliedVersion"]) == (5, 4)  # not pruned

    def copies() -> set[str]:
        return {"desiredVersion", "appliedVersion"} & set(_status(kubectl, "upgraded")["detection"])

    wait_for(lambda: not copies(), 30, "the older copies removed")


def _pods(kubectl: Kubectl, name: str) -> dict[str, dict[str, Any]]:
    items = (kubectl.get("pods", "-n", NS, "-l", f"moe-ep.io/deployment={name}") or {})["items"]
    return {pod["metadata"]["name"]: pod for pod in items}


def test_a_template_change_replaces_every_pod_once(kubectl: Kubectl, operator: Any) -> None:
    """The real StatefulSet controller with OnDelete, and the operator deleting the old pods
    together (with its ServiceAccount's RBAC); no node runs them here, so pods stay Pending."""
    _apply(kubectl, _small("gang", updateStrategy=IN_PLACE))
    sts = wait_for(lambda: kubectl.get("statefulset", "gang", "-n", NS), 30, "StatefulSet")
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    world = sts["spec"]["replicas"]
    before = wait_for(lambda: len(_pods(kubectl, "gang")) == world and _pods(kubectl, "gang"), 60)
    old = {pod["metadata"]["labels"]["controller-revision-hash"] for pod in before.values()}
    _apply(kubectl, _small("gang", updateStrategy=IN_PLACE, worker__image="example.org/worker:2"))

    def replaced() -> dict[str, dict[str, Any]] | None:
        sts = kubectl.get("statefulset", "gang", "-n", NS)
        revision = (sts.get("status") or {}).get("updateRevision")
        if revision in old:  # the controller has not seen the new template yet
            return None
        pods = _pods(kubectl, "gang")
        labels = {p["metadata"]["labels"].get("controller-revision-hash") for p in pods.values()}
        return pods if len(pods) == world and labels == {revision} else None

    after = wait_for(replaced, 60, "every pod on the new revision")
    for name, pod in after.items():
        assert pod["metadata"]["uid"] != before[name]["metadata"]["uid"], name
        container = pod["spec"]["containers"][0]
        assert container["image"] == "example.org/worker:2"
    events = kubectl.run(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.name=gang", "-o", "json"
    ).stdout
    assert "GroupRestart" in events


def test_kubectl_scale_adds_and_removes_a_group_and_an_hpa_is_accepted(
    kubectl: Kubectl, operator: Any
) -> None:
    """The scale subresource on a real API server: `kubectl scale` sets spec.replicas, the
    operator starts group 1 (its own StatefulSet) and reports status.replicas and the selector
    an HPA reads; the sample HPA, aimed at it, is accepted; scaling in removes group 1 (its
    pods never run here: a group that serves nothing drains at once)."""
    _apply(kubectl, _small("scaled"))
    wait_for(lambda: kubectl.get("statefulset", "scaled", "-n", NS), 30, "group 0")
    kubectl.run("scale", "moed", "scaled", "-n", NS, "--replicas=2")
    group1 = wait_for(lambda: kubectl.get("statefulset", "scaled-g1", "-n", NS), 30, "group 1")
    assert group1["spec"]["selector"]["matchLabels"]["moe-ep.io/group"] == "1"
    assert group1["metadata"]["ownerReferences"][0]["name"] == "scaled"
    path = f"/apis/moe-ep.io/v1alpha1/namespaces/{NS}/moedeployments/scaled/scale"

    def scale() -> dict[str, Any]:
        return json.loads(kubectl.run("get", "--raw", path).stdout)

    found = wait_for(lambda: (s := scale())["status"].get("replicas") == 2 and s, 30, "2 groups")
    assert found["kind"] == "Scale" and found["spec"]["replicas"] == 2
    assert found["status"]["selector"] == "moe-ep.io/deployment=scaled,moe-ep.io/role=leader"
    hpa = yaml.safe_load((ROOT / "manifests/samples/autoscaling/hpa.yaml").read_text())
    hpa["apiVersion"] = "autoscaling/v2beta2"  # what 1.20 serves; v2 (1.23) has the same fields
    hpa["metadata"]["name"] = hpa["spec"]["scaleTargetRef"]["name"] = "scaled"
    _apply(kubectl, hpa)
    stored = kubectl.get("hpa.v2beta2.autoscaling", "scaled", "-n", NS)
    assert stored and stored["spec"]["scaleTargetRef"]["kind"] == "MoEDeployment"
    kubectl.run("delete", "hpa", "scaled", "-n", NS)
    kubectl.run("scale", "moed", "scaled", "-n", NS, "--replicas=1")
    wait_for(lambda: kubectl.get("statefulset", "scaled-g1", "-n", NS) is None, 30, "group 1 gone")
    assert kubectl.get("statefulset", "scaled", "-n", NS) is not None
    assert wait_for(lambda: scale()["status"].get("replicas") == 1, 30, "1 group")
    kubectl.run("delete", "moed", "scaled", "-n", NS)
