"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk, no cluster)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.requirements import require_module

helm = require_module("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "moe-ep"
NAMESPACE = "moe-ep-system"  # the `render` fixture's default release namespace

Obj = dict[str, Any]
Render = Callable[..., list[Obj]]

# The operator's least privilege, as decided in the design (kopf standalone, all namespaces).
EXPECTED_RBAC = {
    ("moe-ep.io", "moedeployments"): {"get", "list", "watch", "patch", "update"},
    ("moe-ep.io", "moedeployments/status"): {"get", "patch", "update"},
    # Children get a blocking owner reference: the OwnerReferences admission plugin asks for it.
    ("moe-ep.io", "moedeployments/finalizers"): {"update"},
    # Children are read by name, never watched, and deleted by garbage collection; replica
    # groups' StatefulSets are listed by label and a drained group's deleted; the router.
    ("apps", "statefulsets"): {"get", "list", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "create", "patch", "delete"},
    ("", "serviceaccounts"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create", "patch"},
    ("", "services"): {"get", "create", "patch"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "secrets"): {"get", "create"},  # the token: created once, read for hand-offs
    # the groups' budgets and the router's; a removed group's goes
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    # addresses and readiness; a lost rank (watched); group restarts; group, role and traffic
    # labels; get and watch are also what the router's Role grants (held to grant them)
    ("", "pods"): {"get", "list", "watch", "patch", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
ALL_MONITORING = {
    "prometheus": {
        "rule": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
    }
}


def kinds(objects: list[Obj]) -> list[str]:
    return sorted(obj["kind"] for obj in objects)


def one(objects: list[Obj], kind: str) -> Obj:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[Obj]) -> Obj:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def rbac_rules(role: Obj) -> dict[tuple[str, str], set[str]]:
    """Flatten a role's rules to {(apiGroup, resource): verbs}, each pair listed once."""
    flat: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in flat, f"{group}/{resource} listed twice"
                flat[(group, resource)] = set(rule["verbs"])
    return flat


def port_lists(node: Any) -> Iterator[list[Obj]]:
    """Every `ports` list anywhere in an object (containers, Services)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ports" and isinstance(value, list):
                yield value
            yield from port_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from port_lists(item)


# --- lint and metadata ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [None, {"watchNamespace": "ml", **ALL_MONITORING}],
    ids=["defaults", "namespaced-with-monitoring"],
)
def test_lint_passes_strict(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_chart_metadata(chart: Any) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "moe-ep"
    assert meta["appVersion"] == "0.1.0"
    assert meta["kubeVersion"] == ">=1.20.0-0"


def test_chart_ships_the_crd(chart: Any) -> None:
    source = ROOT / "crds" / "moedeployments.moe-ep.io.yaml"
    assert source.exists(), "generate it: moe-ep crd > crds/moedeployments.moe-ep.io.yaml"
    copy = CHART_DIR / "crds" / source.name
    assert copy.read_bytes() == source.read_bytes(), "run python hack/render_manifests.py"
    assert [crd["filename"] for crd in chart.crds] == [f"moe-ep/crds/{source.name}"]


# --- default values ---------------------------------------------------------------------------


def test_defaults_render_the_operator_only(render: Render) -> None:
    objects = render()
    assert kinds(objects) == sorted(
        ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    )


def test_namespaced_objects_carry_no_namespace(render: Render) -> None:
    """`kubectl apply -n NS` and Helm put them in the release namespace; nothing hard-codes it."""
    for obj in render(ALL_MONITORING):
        assert "namespace" not in obj["metadata"], obj["kind"]


def test_recommended_labels_everywhere(render: Render) -> None:
    for obj in render(ALL_MONITORING):
        labels = obj["metadata"]["labels"]
        for key in RECOMMENDED_LABELS:
            assert key in labels, f"{obj['kind']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == "moe-ep"
        assert labels["app.kubernetes.io/version"] == "0.1.0"


def test_operator_deployment_defaults(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "moe-ep-operator"
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "moe-ep-operator"
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()

    main = container(objects)
    assert main["image"] == "ghcr.io/moe-ep/moe-ep-operator:0.1.0"
    assert main["command"] == ["moe-operator"]
    assert main["args"] == [
        "--all-namespaces",
        "--liveness-port",
        "8081",
        "--metrics-port",
        "9090",
        "--bind-address",
        "$(POD_IP)",
    ]
    # The pod's own IP, not 0.0.0.0: only probes and scrapes of the pod reach the endpoints.
    assert main["env"][0] == {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    ports = {port["name"]: port for port in main["ports"]}
    assert ports["health"]["containerPort"] == 8081
    assert ports["metrics"]["containerPort"] == 9090
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert main["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }


def test_operator_runs_locked_down(render: Render) -> None:
    objects = render()
    pod_security = one(objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 65532
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(objects)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_every_port_says_tcp(render: Render) -> None:
    """Server-side apply on Kubernetes 1.20 rejects ports without an explicit protocol."""
    seen = 0
    for obj in render(ALL_MONITORING):
        if obj["kind"] not in {"Deployment", "Service"}:
            continue
        for ports in port_lists(obj["spec"]):
            for port in ports:
                assert port.get("protocol") == "TCP", (obj["kind"], port)
                seen += 1
    assert seen == 3


def test_service_exposes_the_metrics_port(render: Render) -> None:
    objects = render()
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_rbac_is_exactly_least_privilege(render: Render) -> None:
    objects = render()
    role = one(objects, "ClusterRole")
    assert rbac_rules(role) == EXPECTED_RBAC
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "moe-ep-operator", "namespace": NAMESPACE}
    ]
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "moe-ep-operator"


def test_release_namespace_is_the_binding_subject(render: Render) -> None:
    binding = one(render(namespace="ops"), "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "ops"


def test_other_release_names_prefix_every_object(render: Render) -> None:
    objects = render(release="canary")
    names = {obj["metadata"]["name"] for obj in objects}
    assert names == {"canary-moe-ep-operator"}


# --- non-default values -----------------------------------------------------------------------


def test_watch_namespace_binds_in_that_namespace_only(render: Render) -> None:
    objects = render({"watchNamespace": "ml"})
    assert "ClusterRoleBinding" not in kinds(objects)
    assert container(objects)["args"][:2] == ["--namespace", "ml"]
    assert "--all-namespaces" not in container(objects)["args"]
    binding = one(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "ml"
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "moe-ep-operator", "namespace": NAMESPACE}
    ]
    assert rbac_rules(one(objects, "ClusterRole")) == EXPECTED_RBAC


def test_custom_image_resources_and_args(render: Render) -> None:
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": 2, "memory": "2Gi"}}
    objects = render(
        {
            "image": {"repository": "registry.local/moe", "tag": "dev", "pullPolicy": "Always"},
            "imagePullSecrets": ["regcred"],
            "resources": resources,
            "extraArgs": ["--verbose"],
            "extraEnv": [{"name": "MOE_OPERATOR_TIMER_SECONDS", "value": "1"}],
            "livenessPort": 18081,
            "metricsPort": 19090,
            "nodeSelector": {"kubernetes.io/os": "linux"},
        }
    )
    main = container(objects)
    assert main["image"] == "registry.local/moe:dev"
    assert main["imagePullPolicy"] == "Always"
    assert main["resources"] == resources
    assert main["args"][-1] == "--verbose"
    names = [item["name"] for item in main["env"]]
    assert names[0] == "POD_IP" and names[-1] == "MOE_OPERATOR_TIMER_SECONDS"
    assert main["args"][1:5] == ["--liveness-port", "18081", "--metrics-port", "19090"]
    assert {p["containerPort"] for p in main["ports"]} == {18081, 19090}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert one(objects, "Deployment")["metadata"]["labels"]["app.kubernetes.io/version"] == "dev"


def test_image_digest_wins_over_tag(render: Render) -> None:
    digest = "sha256:" + "ab" * 32
    main = container(render({"image": {"tag": "dev", "digest": digest}}))
    assert main["image"] == f"ghcr.io/moe-ep/moe-ep-operator@{digest}"


def worker_images(objects: list[Obj]) -> dict[str, str]:
    env = {item["name"]: item.get("value") for item in container(objects)["env"]}
    return {key: env[key] for key in ("MOE_WORKER_IMAGE", "MOE_WORKER_IMAGE_CUDA")}


def test_the_operator_gets_the_default_worker_images(render: Render) -> None:
    assert worker_images(render()) == {
        "MOE_WORKER_IMAGE": "ghcr.io/moe-ep/moe-ep-worker:0.1.0",
        "MOE_WORKER_IMAGE_CUDA": "ghcr.io/moe-ep/moe-ep-worker:0.1.0-cuda",
    }


def test_worker_images_follow_their_values_and_keep_extra_env(render: Render) -> None:
    objects = render(
        {
            "workerImage": {"repository": "registry.local/worker", "tag": "dev"},
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        }
    )
    assert worker_images(objects) == {
        "MOE_WORKER_IMAGE": "registry.local/worker:dev",
        "MOE_WORKER_IMAGE_CUDA": "registry.local/worker:dev-cuda",
    }
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container(objects)["env"]


def test_existing_service_account(render: Render) -> None:
    objects = render({"serviceAccount": {"create": False, "name": "pre-made"}})
    assert "ServiceAccount" not in kinds(objects)
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "pre-made"
    )
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "pre-made"


def test_existing_service_account_needs_a_name(render: Render) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})


def test_rbac_can_be_left_to_the_admin(render: Render) -> None:
    assert kinds(render({"rbac": {"create": False}})) == ["Deployment", "Service", "ServiceAccount"]


def test_monitoring_objects(render: Render) -> None:
    values = {
        "prometheus": {
            "rule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
            "serviceMonitor": {"enabled": True, "interval": "1m"},
            "podMonitor": {"enabled": True, "interval": "10s"},
        }
    }
    objects = render(values)
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    rules_file = yaml.safe_load((ROOT / "manifests/prometheus/rules.yaml").read_text())
    assert rule["spec"] == rules_file, "the PrometheusRule must carry the rules file's groups"

    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["interval"] == "1m"
    assert endpoint["honorLabels"] is True

    pods = one(objects, "PodMonitor")
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    assert pods["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "moe-ep-worker",
        "app.kubernetes.io/managed-by": "moe-ep-operator",
    }
    (worker_endpoint,) = pods["spec"]["podMetricsEndpoints"]
    assert worker_endpoint["port"] == "metrics"
    assert worker_endpoint["path"] == "/metrics"
    assert worker_endpoint["interval"] == "10s"
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_moe_ep_io_deployment"],
        "targetLabel": "moedeployment",
    } in worker_endpoint["relabelings"]


def test_pod_monitor_follows_watch_namespace(render: Render) -> None:
    values = {"watchNamespace": "ml", "prometheus": {"podMonitor": {"enabled": True}}}
    pods = one(render(values), "PodMonitor")
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_notes_render(chart: Any) -> None:
    notes = chart.render({"watchNamespace": "ml"}, name="moe-ep", namespace=NAMESPACE)
    text = notes["moe-ep/templates/NOTES.txt"]
    assert "namespace ml" in text
    assert "kubectl -n moe-ep-system get deployment moe-ep-operator" in text


# --- values.yaml and its schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 2},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"digest": "latest"}},
        {"workerImage": {"repository": ""}},
        {"workerImage": {"tag": "a:b"}},
        {"metricsPort": 70000},
        {"livenessPort": "8081"},
        {"watchNamespace": "Not_A_Namespace"},
        {"resources": {"requests": {"cpu": "lots"}}},
        {"resources": {"requests": {"gpu": 1}}},
        {"serviceAccount": {"create": "yes"}},
        {"service": {"type": "Ingress"}},
        {"prometheus": {"rule": {"enabled": "true"}}},
        {"prometheus": {"podMonitor": {"interval": "often"}}},
        {"prometheus": {"alertmanager": {}}},
    ],
    ids=lambda values: yaml.safe_dump(values, default_flow_style=True).strip(),
)
def test_schema_rejects_bad_values(chart: Any, render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_schema_accepts_defaults_and_examples(chart: Any) -> None:
    chart.validate_schema({})
    chart.validate_schema(chart.values)
    chart.validate_schema({"watchNamespace": "ml", **ALL_MONITORING})
    chart.validate_schema({"resources": {"limits": {"cpu": 1, "memory": "1.5Gi"}}})


def test_schema_lists_every_top_level_value(chart: Any) -> None:
    assert set(chart.values) <= set(chart.schema["properties"])


# Keys whose contents are Kubernetes objects, documented by Kubernetes itself.
PASS_THROUGH = {"resources", "podSecurityContext", "securityContext"}


def test_values_are_camel_case_and_documented() -> None:
    """Helm best practice: every value has a comment that starts with its name."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")):
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_pass_through = any(parent in PASS_THROUGH for _, parent in stack)
        stack.append((indent, key))
        if inside_pass_through:
            continue
        assert key[0].islower() and key.isalnum(), f"values.yaml:{number + 1}: {key} not camelCase"
        first = number
        while first > 0 and lines[first - 1].strip().startswith("#"):
            first -= 1
        comment = lines[first].strip() if first < number else ""
        if not comment.startswith(f"# {key} "):
            undocumented.append(f"values.yaml:{number + 1}: {key}")
    assert undocumented == []
