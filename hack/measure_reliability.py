#!/usr/bin/env python3
"""Measure issue 11's numbers on the local cluster, for whatever operator this checkout installs.

    python hack/measure_reliability.py [--json out.json]

Starts the local cluster (real control plane, node agent), installs the chart, deploys 4 CPU
workers with skewed traffic, and measures, in order:

1. the plan record: delete the plan ConfigMap at plan N; which version comes back; which version
   the group serves after a worker is killed;
2. a harmless template change (one extra env variable): seconds without a ready group, and how
   often each pod was replaced, until every pod is new and ready (or a timeout);
3. a model shape change (2 -> 4 layers): the same;
4. an oversized spec (1024 layers x 1024 experts x 4096 ranks): the operator's RSS before, at
   its peak over 20 s, and after.

Only the API server, the pods' HTTP endpoints and /proc are used, so the script measures an old
operator as well as a new one (install that checkout's packages in their own virtualenv and run
the script with its Python).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from moe_local import install
from moe_local.cluster import LocalCluster, LocalClusterConfig
from moe_local.controlplane import ensure_binaries

NS, NAME, WORLD = "measure", "m", 4
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "moe-ep.io/v1alpha1",
    "kind": "MoEDeployment",
    "metadata": {"name": NAME},
    "spec": {
        "model": {"layers": 2, "expertsPerLayer": 8, "hiddenSize": 32, "ffnHiddenSize": 64,
                  "attentionHeads": 2, "headDim": 16, "topK": 2, "dtype": "float32"},
        "parallelism": {"expert": WORLD},
        "placement": {"slotsPerRank": 3},
        "rebalancing": {"imbalanceThreshold": 1.2, "evaluationWindowSeconds": 3,
                        "consecutiveEvaluations": 2, "cooldownSeconds": 600},
        "worker": {"gpusPerPod": 1, "backend": "gloo", "device": "cpu",
                   "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                   "extraArgs": ["--traffic-batch", "2", "--traffic-seq-len", "16", "--zipf",
                                 "1.5", "--traffic-interval", "0.02"]},
    },
}  # fmt: skip


class Measure:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> Any:
        return install.kubectl(self.cluster.kubeconfig, *args, stdin=stdin, check=check)

    def get(self, *args: str) -> dict[str, Any] | None:
        return install.get_json(self.cluster.kubeconfig, *args)

    def status(self, name: str = NAME) -> dict[str, Any]:
        return (self.get("moed", name, "-n", NS) or {}).get("status") or {}

    def workers(self) -> dict[str, dict[str, Any]]:
        pods = (self.get("pods", "-n", NS, "-l", f"moe-ep.io/deployment={NAME}") or {})["items"]
        out = {}
        for pod in pods:
            container = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
            cid = container.get("containerID") or ""
            out[pod["metadata"]["name"]] = {
                "uid": pod["metadata"]["uid"],
                "ready": bool(container.get("ready")),
                "pid": int(cid.removeprefix("local://")) if cid.startswith("local://") else None,
                "ip": (pod.get("status") or {}).get("podIP"),
            }
        return out

    def all_ready(self) -> dict[str, dict[str, Any]] | None:
        workers = self.workers()
        ok = len(workers) == WORLD and all(w["ready"] and w["pid"] for w in workers.values())
        return workers if ok else None

    def leader_version(self) -> int | None:
        ip = (self.workers().get(f"{NAME}-0") or {}).get("ip")
        try:
            with NO_PROXY.open(f"http://{ip}:8080/v1/plan", timeout=3) as response:
                return int(json.loads(response.read())["version"])
        except (OSError, ValueError, KeyError):
            return None

    def configmap_versions(self) -> list[int]:
        data = (self.get("configmap", f"{NAME}-plan", "-n", NS) or {}).get("data") or {}
        versions = []
        for raw in data.values():
            try:
                versions.append(int(json.loads(raw)["version"]))
            except (ValueError, KeyError, TypeError):
                continue
        return versions

    def operator_rss_mb(self) -> float:
        pods = self.get("pods", "-n", install.SYSTEM_NAMESPACE, "-l",
                        "app.kubernetes.io/component=operator")["items"]  # fmt: skip
        cid = pods[0]["status"]["containerStatuses"][0]["containerID"]
        status = Path(f"/proc/{int(cid.removeprefix('local://'))}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def patch_spec(self, spec: dict[str, Any]) -> None:
        self.kubectl("patch", "moed", NAME, "-n", NS, "--type=merge", "-p",
                     json.dumps({"spec": spec}))  # fmt: skip


def wait(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def plan_record(m: Measure) -> dict[str, Any]:
    wait("a rebalanced plan applied", lambda: (p := m.status().get("plan") or {}).get(
        "appliedVersion", 0) >= 2 and p["appliedVersion"] == p["version"], 180)  # fmt: skip
    before = m.status()["plan"]["version"]
    m.kubectl("delete", "configmap", f"{NAME}-plan", "-n", NS)
    back = wait("the plan ConfigMap back", m.configmap_versions, 60)
    time.sleep(5)  # let the status follow
    victim = wait("workers ready", m.all_ready, 60)[f"{NAME}-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait("rank 1 restarted and the group ready", lambda: (w := m.all_ready()) and w[f"{NAME}-1"][
        "pid"] != victim, 120)  # fmt: skip
    time.sleep(10)
    return {
        "status_version_before": before,
        "configmap_versions_after_delete": back,
        "status_after": {k: m.status()["plan"].get(k) for k in ("version", "appliedVersion")},
        "leader_after_worker_restart": m.leader_version(),
    }


def group_change(m: Measure, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    before = wait("workers ready", m.all_ready, 180)
    samples: list[tuple[float, int, dict[str, str]]] = []
    started = time.monotonic()
    m.patch_spec(spec)
    finished = None
    while time.monotonic() - started < timeout:
        workers = m.workers()
        ready = sum(w["ready"] for w in workers.values())
        samples.append((time.monotonic(), ready, {n: w["uid"] for n, w in workers.items()}))
        new = all(workers.get(p, {}).get("uid") not in (None, before[p]["uid"]) for p in before)
        if new and ready == WORLD and m.status().get("phase") == "Running":
            finished = time.monotonic() - started
            break
        time.sleep(0.25)
    down = sum(b[0] - a[0] for a, b in itertools.pairwise(samples) if a[1] < WORLD)
    uids: dict[str, set[str]] = {}
    for _, _, seen in samples:
        for name, uid in seen.items():
            uids.setdefault(name, set()).add(uid)
    return {
        "seconds_without_a_ready_group": round(down, 1),
        "seconds_until_running": None if finished is None else round(finished, 1),
        "recovered": finished is not None,
        "replacements_per_pod": {name: len(u) - 1 for name, u in sorted(uids.items())},
        "phase_at_end": m.status().get("phase"),
    }


def oversized(m: Measure) -> dict[str, Any]:
    before = m.operator_rss_mb()
    huge = copy.deepcopy(DEPLOYMENT)
    huge["metadata"]["name"] = "huge"
    huge["spec"]["model"].update({"layers": 1024, "expertsPerLayer": 1024})
    huge["spec"]["parallelism"]["expert"] = 4096
    m.kubectl("apply", "-n", NS, "-f", "-", stdin=json.dumps(huge))
    peak = before
    for _ in range(20):
        time.sleep(1)
        peak = max(peak, m.operator_rss_mb())
    after = m.operator_rss_mb()
    condition = next((c for c in m.status("huge").get("conditions") or []
                      if c["type"] == "SpecValid"), {})  # fmt: skip
    m.kubectl("delete", "moed", "huge", "-n", NS, "--wait=false")
    return {
        "rss_mb_before": round(before), "rss_mb_peak": round(peak), "rss_mb_after": round(after),
        "spec_valid": condition.get("status"), "message": condition.get("message", "")[:160],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per group change")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moe-measure-"))
    cluster = LocalCluster(LocalClusterConfig(workdir=workdir, bin_dir=ensure_binaries(), gpus=8))
    results: dict[str, Any] = {}
    cluster.up()
    try:
        m = Measure(cluster)
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        cluster.create_namespace(NS)
        install.helm_install(cluster.kubeconfig, install.operator_values(timer_seconds=1))
        install.wait_until(lambda: install.operator_ready(cluster.kubeconfig), 120, "operator")
        m.kubectl("apply", "-n", NS, "-f", "-", stdin=json.dumps(DEPLOYMENT))
        steps = [
            ("plan_record", lambda: plan_record(m)),
            ("template_change", lambda: group_change(
                m, {"worker": {"extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"},
                                            {"name": "MEASURE", "value": "2"}]}}, args.timeout)),
            ("shape_change", lambda: group_change(m, {"model": {"layers": 4}}, args.timeout)),
            ("oversized_spec", lambda: oversized(m)),
        ]  # fmt: skip
        for key, step in steps:
            try:
                results[key] = step()
            except Exception as error:  # a step that cannot finish is a result too
                results[key] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    finally:
        left = cluster.down()
        results["processes_left"] = left
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
