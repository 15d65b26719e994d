"""The local control plane schedules a GPU pod onto a hand-made Node and stops cleanly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from moe_local.controlplane import ControlPlane, ControlPlaneConfig, ensure_binaries
from moe_local.kube import MERGE_PATCH
from tests.integration.kubectl import Kubectl, wait_for
from tests.requirements import require_tool

pytestmark = pytest.mark.integration

NAMESPACE = "cp-test"
NODE = "gpu-node-0"


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    return Kubectl(str(kubeconfig)).run(*args, stdin=stdin).stdout


def live_process_groups() -> set[int]:
    groups = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the ")" closing the command name: state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            groups.add(int(fields[2]))
    return groups


def gpu_node_status() -> dict:
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "16"}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    return {"status": {"capacity": resources, "allocatable": resources, "conditions": [ready]}}


def gpu_pod() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gpu-pod", "namespace": NAMESPACE},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": "moe-worker:local",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ]
        },
    }


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    require_tool("kubectl")
    return ensure_binaries()


def test_schedules_gpu_pod_and_stops_cleanly(bin_dir: Path, tmp_path: Path) -> None:
    plane = ControlPlane(ControlPlaneConfig(workdir=tmp_path, bin_dir=bin_dir))
    with plane:
        hooked: list[Path] = []
        plane.start(before_controllers=hooked.append)
        assert hooked == [plane.kubeconfig]
        kubeconfig = plane.kubeconfig
        token_secret = plane.wait_for_service_account_token("default")
        secret = plane.core().read_namespaced_secret(token_secret, "default")
        assert secret.type == "kubernetes.io/service-account-token"

        kubectl(kubeconfig, "create", "namespace", NAMESPACE)
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}
        kubectl(kubeconfig, "create", "-f", "-", stdin=json.dumps(node))
        # Through the API, not `kubectl patch --subresource` (kubectl 1.20 has no such flag).
        plane.core().patch_node_status(NODE, gpu_node_status(), _content_type=MERGE_PATCH)
        # Pods are rejected until the namespace's default ServiceAccount has its token.
        plane.wait_for_service_account_token(NAMESPACE)
        kubectl(kubeconfig, "create", "-f", "-", stdin=json.dumps(gpu_pod()))

        def bound_node() -> str:
            return kubectl(
                kubeconfig, "get", "pod", "gpu-pod", "-n", NAMESPACE,
                "-o", "jsonpath={.spec.nodeName}",
            )  # fmt: skip

        wait_for(lambda: bound_node() == NODE, 30, "the pod bound to the GPU node")
        groups = set(plane.pids().values())
        assert len(groups) == 4

    assert plane.pids() == {}
    assert not groups & live_process_groups()
