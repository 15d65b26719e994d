"""The chart's objects are accepted by the real local API server (Kubernetes v1.20).

Two paths, the two ways users install:
- `kubectl apply --server-side --dry-run=server` of the CRD and manifests/ (and of a namespaced
  render of the chart): admission, validation and server-side apply, with nothing persisted.
- a real install and uninstall through Helm's Go SDK (helm-python-sdk, which applies server-side),
  checking the least-privilege RBAC as the API server evaluates it.

The Prometheus Operator objects are not applied: the local cluster lacks the monitoring.coreos.com
CRDs. The operator pod of the real install gets a node selector no node matches: nothing runs it.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.kubectl import Kubectl
from tests.requirements import require_module, require_tool

helm = require_module("helm_python")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "moe-ep"
CRD = ROOT / "crds" / "moedeployments.moe-ep.io.yaml"
FIELD_MANAGER = "moe-ep-chart-test"
UNSCHEDULABLE = {"nodeSelector": {"moe-ep.io/chart-test": "never-schedule"}}


def kubectl(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return Kubectl(kubeconfig).run(*args, check=check)


def server_dry_run(kubeconfig: str, namespace: str, *files: Path) -> str:
    args = ["apply", "--server-side", "--dry-run=server", f"--field-manager={FIELD_MANAGER}"]
    args += ["-n", namespace]
    for path in files:
        args += ["-f", str(path)]
    return kubectl(kubeconfig, *args).stdout


@pytest.fixture
def namespace(kube_admin_kubeconfig: str) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (with everything in it)."""
    require_tool("kubectl")
    name = f"chart-test-{secrets.token_hex(3)}"
    kubectl(kube_admin_kubeconfig, "create", "namespace", name)
    yield name
    kubectl(kube_admin_kubeconfig, "delete", "namespace", name, "--wait=false", check=False)


def test_manifests_pass_server_side_dry_run(kube_admin_kubeconfig: str, namespace: str) -> None:
    if not CRD.exists():
        pytest.fail(f"{CRD.relative_to(ROOT)} is missing")
    server_dry_run(kube_admin_kubeconfig, namespace, CRD)
    output = server_dry_run(
        kube_admin_kubeconfig,
        namespace,
        ROOT / "manifests" / "rbac.yaml",
        ROOT / "manifests" / "operator.yaml",
    )
    for applied in (
        "serviceaccount/moe-ep-operator",
        "clusterrole.rbac.authorization.k8s.io/moe-ep-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/moe-ep-operator",
        "deployment.apps/moe-ep-operator",
        "service/moe-ep-operator",
    ):
        assert applied in output, output


def test_namespaced_render_passes_server_side_dry_run(
    kube_admin_kubeconfig: str, namespace: str, tmp_path: Path
) -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(
            {"watchNamespace": namespace, "image": {"tag": "dev"}},
            name="namespaced",
            namespace=namespace,
            is_install=True,
        )
    documents = [text for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")]
    manifest = tmp_path / "namespaced.yaml"
    manifest.write_text("\n---\n".join(documents))
    output = server_dry_run(kube_admin_kubeconfig, namespace, manifest)
    assert "rolebinding.rbac.authorization.k8s.io/namespaced-moe-ep-operator" in output, output


def rendered_cluster_role(release: str, namespace: str) -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(UNSCHEDULABLE, name=release, namespace=namespace)
    (role,) = [
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "ClusterRole"
    ]
    return role


def can_i(kubeconfig: str, user: str, verb: str, resource: str, *scope: str) -> bool:
    result = kubectl(
        kubeconfig, "auth", "can-i", verb, resource, f"--as={user}", *scope, check=False
    )
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, result.stderr
    return answer == "yes"


def test_helm_sdk_installs_the_chart(kube_admin_kubeconfig: str, namespace: str) -> None:
    release = f"ct-{secrets.token_hex(3)}"
    operator = f"{release}-moe-ep-operator"
    user = f"system:serviceaccount:{namespace}:{operator}"
    with helm.Config(kubeconfig_path=kube_admin_kubeconfig, namespace=namespace) as config:
        summary: dict[str, Any] = config.install(
            CHART_DIR, release, UNSCHEDULABLE, namespace=namespace, timeout=120
        )
        try:
            assert json.dumps(summary).count("Deployment") >= 1
            deployment = json.loads(
                kubectl(
                    kube_admin_kubeconfig,
                    "-n",
                    namespace,
                    "get",
                    "deployment",
                    operator,
                    "-o",
                    "json",
                ).stdout
            )
            args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[0] == "--all-namespaces"
            role = yaml.safe_load(
                kubectl(kube_admin_kubeconfig, "get", "clusterrole", operator, "-o", "yaml").stdout
            )
            assert role["rules"] == rendered_cluster_role(release, namespace)["rules"]

            everywhere = ("--all-namespaces",)
            assert can_i(
                kube_admin_kubeconfig, user, "watch", "moedeployments.moe-ep.io", *everywhere
            )
            assert can_i(
                kube_admin_kubeconfig,
                user,
                "patch",
                "moedeployments.moe-ep.io/status",
                "-n",
                "default",
            )
            assert can_i(kube_admin_kubeconfig, user, "create", "statefulsets.apps", "-n", "ml")
            assert can_i(kube_admin_kubeconfig, user, "create", "events.events.k8s.io", "-n", "ml")
            assert not can_i(kube_admin_kubeconfig, user, "create", "pods", "-n", "ml")
            assert not can_i(
                kube_admin_kubeconfig, user, "delete", "moedeployments.moe-ep.io", "-n", "ml"
            )
            assert not can_i(kube_admin_kubeconfig, user, "list", "nodes")
            assert not can_i(kube_admin_kubeconfig, user, "create", "clusterroles")
        finally:
            config.uninstall(release, timeout=60)
    remaining = kubectl(kube_admin_kubeconfig, "get", "clusterrole", operator, check=False)
    assert remaining.returncode != 0, "uninstall left the ClusterRole behind"
