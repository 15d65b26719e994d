"""Install moe-ep into the local cluster the way a user would: Helm's engine, then kubectl apply.

Shared by `moe-ep demo` and the end-to-end tests, so both exercise the chart users install.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from moe_contract.shape import ModelShape

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "moe-ep"
RELEASE = "moe-ep"
SYSTEM_NAMESPACE = "moe-ep-system"


def operator_values(timer_seconds: float = 2.0) -> dict[str, Any]:
    """Chart values for the local cluster: scraped by the local Prometheus, a quick timer."""
    return {
        "podAnnotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
        "extraEnv": [{"name": "MOE_OPERATOR_TIMER_SECONDS", "value": str(timer_seconds)}],
    }


def helm_install(
    kubeconfig: Path, values: dict[str, Any], namespace: str = SYSTEM_NAMESPACE
) -> dict[str, Any]:
    """`helm install moe-ep charts/moe-ep` through Helm's Go SDK (helm-python-sdk).

    The namespace must exist, with its default ServiceAccount's token: see
    `LocalCluster.create_namespace`.
    """
    import helm_python as helm

    with helm.Config(kubeconfig_path=str(kubeconfig), namespace=namespace) as config:
        return config.install(str(CHART_DIR), RELEASE, values, namespace=namespace, timeout=180)


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result


def get_json(kubeconfig: Path, *args: str) -> dict[str, Any] | None:
    """The object(s) as a dict; None only when NotFound (any other failure raises)."""
    result = kubectl(kubeconfig, "get", *args, "-o", "json", check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr:
            return None
        raise RuntimeError(f"kubectl get {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def apply_document(kubeconfig: Path, namespace: str, document: dict[str, Any]) -> None:
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(document))


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    on_tick: Callable[[], None] | None = None,
    interval: float = 1.0,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        if on_tick:
            on_tick()
        time.sleep(interval)


def operator_ready(kubeconfig: Path) -> bool:
    deployment = get_json(kubeconfig, "deployment", f"{RELEASE}-operator", "-n", SYSTEM_NAMESPACE)
    return bool(deployment and (deployment.get("status") or {}).get("readyReplicas"))


def checkpoint_source(models: Path, path: str) -> dict[str, Any]:
    """`spec.model.source` for the checkpoint directory `path` under `models`, the local
    cluster's hostPath volume (each pod is a local process: the node's directory is ours)."""
    return {
        "type": "Checkpoint",
        "checkpoint": {
            "volume": {"hostPath": {"path": str(models), "type": "Directory"}},
            "path": path,
        },
    }


def synthetic_shape(model: dict[str, Any]) -> ModelShape:
    """The ModelShape of a `spec.model` document's sizes (camelCase), which the local
    checkpoints' synthetic weights are written with."""
    return ModelShape(
        layers=model["layers"],
        experts=model["expertsPerLayer"],
        hidden=model["hiddenSize"],
        ffn_hidden=model["ffnHiddenSize"],
        heads=model["attentionHeads"],
        head_dim=model["headDim"],
        top_k=model["topK"],
        vocab_size=model["vocabSize"],
    )
