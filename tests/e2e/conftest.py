"""One local cluster for the whole end-to-end suite (about 15 s to start, 4 CPU workers).

The real v1.20.2 control plane, the node agent (each pod a local process), Debian's Prometheus
with the project's alert rules; the operator installed with the Helm chart (it runs as the chart's
Deployment, with its ServiceAccount's own credentials); one MoEDeployment of 4 gloo workers with
skewed (Zipf) traffic. The tests in test_e2e.py run in file order against it; the last one deletes
the deployment, and the fixture's teardown asserts `down()` left no process behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from moe_local import install
from moe_local.cluster import LocalCluster, LocalClusterConfig
from moe_local.controlplane import ensure_binaries
from tests.e2e.helpers import E2E, wait_for
from tests.requirements import require_tool

NAMESPACE = "e2e"
NAME = "e2e"
WORLD = 4
THRESHOLD = 1.2


def deployment(name: str = NAME) -> dict[str, Any]:
    """cpu-small with 2 layers, quick windows and skewed traffic.

    consecutiveEvaluations 8 keeps the imbalance above the threshold long enough (>= 24 s) for
    the alert (for: 5s here, 5 s scrape and evaluation) to fire before the rebalance; the long
    cooldown keeps the deployment on one plan after it, so later tests see a stable baseline.
    """
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "layers": 2,
                "expertsPerLayer": 8,
                "hiddenSize": 32,
                "ffnHiddenSize": 64,
                "attentionHeads": 2,
                "headDim": 16,
                "topK": 2,
                "dtype": "float32",
            },
            "parallelism": {"expert": WORLD},
            "placement": {"slotsPerRank": 3},
            "rebalancing": {
                "method": "Auto",
                "imbalanceThreshold": THRESHOLD,
                "evaluationWindowSeconds": 3,
                "consecutiveEvaluations": 8,
                "cooldownSeconds": 600,
            },
            "worker": {
                "gpusPerPod": 1,
                "backend": "gloo",
                "device": "cpu",
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "extraArgs": [
                    "--traffic-batch",
                    "2",
                    "--traffic-seq-len",
                    "16",
                    "--zipf",
                    "1.5",
                    "--traffic-interval",
                    "0.02",
                ],
            },
        },
    }


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    for tool in ("kubectl", "prometheus"):
        require_tool(tool)
    started = time.monotonic()
    cluster = LocalCluster(
        LocalClusterConfig(
            workdir=tmp_path_factory.mktemp("local"),
            bin_dir=ensure_binaries(),
            gpus=8,
            prometheus=True,
            alert_for="5s",
        )
    )
    state = cluster.up()
    try:
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        cluster.create_namespace(NAMESPACE)
        install.helm_install(cluster.kubeconfig, install.operator_values(timer_seconds=1))
        install.wait_until(lambda: install.operator_ready(cluster.kubeconfig), 90, "operator")
        env = E2E(
            cluster=cluster,
            namespace=NAMESPACE,
            name=NAME,
            world=WORLD,
            threshold=THRESHOLD,
            prometheus_url=state["prometheus"]["url"],
        )
        env.apply(deployment())
        wait_for("4 workers Ready", env.all_ready, timeout=120)
        print(
            f"\n[e2e] cluster, operator and {WORLD} workers up in "
            f"{time.monotonic() - started:.0f}s; workdir {cluster.workdir}"
        )
        yield env
    finally:
        left = cluster.down()
        assert left == [], f"processes left behind: {left}"
