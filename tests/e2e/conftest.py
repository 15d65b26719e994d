"""One local cluster for the whole end-to-end suite (about 15 s to start, 4 CPU workers).

The real v1.20.2 control plane, the node agent (each pod a local process), Debian's Prometheus
with the project's alert rules; the operator installed with the Helm chart (it runs as the chart's
Deployment, with its ServiceAccount's own credentials); one MoEDeployment of 4 gloo workers
serving a tiny Mixtral checkpoint (written here by transformers, with a tokenizer) from a
hostPath volume, behind API keys from a Secret, with skewed (Zipf) built-in traffic. The tests in
test_e2e.py run in file order against it (fixture `e2e`); the last one deletes the deployment,
and the cluster fixture's (`local`) teardown asserts `down()` left no process behind.
test_replicas.py needs only the cluster and brings its own deployment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moe_local import install
from moe_local.cluster import LocalCluster, LocalClusterConfig
from moe_local.controlplane import ensure_binaries
from tests.e2e.helpers import E2E, wait_for
from tests.e2e.models import mixtral_spec, write_mixtral
from tests.requirements import require_module, require_tool

NAMESPACE = "e2e"
NAME = "e2e"
WORLD = 4
THRESHOLD = 1.2
VOCAB = 64
CHECKPOINT = "e2e-mixtral"  # 2 layers, the deployment's shape
CHECKPOINT_4_LAYERS = "e2e-mixtral-4"  # for the shape change
API_KEY = "sk-e2e-client"
API_KEYS_SECRET = "e2e-api-keys"


def checkpoint_source(models: Path, path: str = CHECKPOINT) -> dict[str, Any]:
    return install.checkpoint_source(models, path)


def deployment(models: Path, name: str = NAME) -> dict[str, Any]:
    """A tiny Mixtral from a hostPath volume, 2 layers, quick windows and skewed traffic.

    consecutiveEvaluations 8 keeps the imbalance above the threshold long enough (>= 24 s) for
    the alert (for: 5s here, 5 s scrape and evaluation) to fire before the rebalance; the long
    cooldown keeps the deployment on one plan after it, so later tests see a stable baseline.
    """
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {**mixtral_spec(2, VOCAB), "source": checkpoint_source(models)},
            "parallelism": {"expert": WORLD},
            "placement": {"slotsPerRank": 3},
            # One group, restarted in place by a template change (test_e2e.py counts its
            # restarts), and no router: `<name>-api` selects the leader (token-id prompts,
            # which smg 1.13 refuses). test_replicas.py runs groups behind the router.
            "updateStrategy": {"maxSurge": 0, "maxUnavailable": 1},
            "router": {"type": "None"},
            "rebalancing": {
                "method": "Auto",
                "imbalanceThreshold": THRESHOLD,
                "evaluationWindowSeconds": 3,
                "consecutiveEvaluations": 8,
                "cooldownSeconds": 600,
            },
            "worker": {
                "gpusPerPod": 1,
                # Not the default 29500: a worker before rank 0's store listened on its pod's
                # address only took that port on every address, and such a concurrent run on
                # the same machine would take our rendezvous.
                "masterPort": 29517,
                # A worker that does not answer at all is restarted after half of it: the
                # hang tests (SIGSTOP, then SIGCONT) hold a worker for up to ~40 s.
                "stallTimeoutSeconds": 120,
                "backend": "gloo",
                "device": "cpu",
                "apiKeys": {"secretName": API_KEYS_SECRET, "key": "keys"},
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
                    # The hang tests stop a worker (SIGSTOP) for up to ~40 s to test what the
                    # operator reads of a hung worker, not the membership dropping it (5 s by
                    # default; tests/worker/test_elastic.py has that). A dead rank is still
                    # dropped within seconds: a failed collective starts the 1.5 s suspicion.
                    # And four ranks on a loaded 2-core machine can be starved of 5 s.
                    "--heartbeat-timeout",
                    "60",
                ],
            },
        },
    }


@dataclass(frozen=True)
class Local:
    """The suite's local cluster with the operator installed, and the checkpoints' volume."""

    cluster: LocalCluster
    prometheus_url: str
    models: Path  # the hostPath volume holding the checkpoints


@pytest.fixture(scope="session")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    for tool in ("kubectl", "prometheus"):
        require_tool(tool)
    require_module("transformers")  # writes the checkpoints, as a user's training job would
    started = time.monotonic()
    models = tmp_path_factory.mktemp("models")  # the hostPath volume
    write_mixtral(models / CHECKPOINT, layers=2, vocab_size=VOCAB, seed=0)
    write_mixtral(models / CHECKPOINT_4_LAYERS, layers=4, vocab_size=VOCAB, seed=1)
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
        print(f"\n[e2e] cluster and operator up in {time.monotonic() - started:.0f}s")
        yield Local(cluster, state["prometheus"]["url"], models)
    finally:
        left = cluster.down()
        assert left == [], f"processes left behind: {left}"


@pytest.fixture(scope="session")
def e2e(local: Local) -> E2E:
    started = time.monotonic()
    env = E2E(
        cluster=local.cluster,
        namespace=NAMESPACE,
        name=NAME,
        world=WORLD,
        threshold=THRESHOLD,
        prometheus_url=local.prometheus_url,
        models=local.models,
        api_key=API_KEY,
    )
    env.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": API_KEYS_SECRET},
            "stringData": {"keys": f"{API_KEY}\nsk-another-client\n"},
        }
    )
    env.apply(deployment(local.models))
    wait_for("4 workers Ready", env.all_ready, timeout=120)
    print(
        f"\n[e2e] {WORLD} workers up in {time.monotonic() - started:.0f}s; "
        f"workdir {local.cluster.workdir}"
    )
    return env
