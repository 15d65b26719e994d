#!/usr/bin/env python3
"""Issue 12, item 5: from one failed rank to serving again, on the local cluster.

    python hack/measure_rank_failure.py [--trials 3] [--json out.json]

Starts the local cluster (real control plane, node agent), installs the chart, deploys 2 CPU
pods of 2 ranks each (gloo, world 4, a small synthetic model, stallTimeoutSeconds 5), and, for
each trial, hurts one rank process of pod 1 (a child of the pod's launcher), then asks the
`-api` endpoint for a completion every 0.25 s:

- kill: SIGKILL. The pod's launcher sees its rank die, stops the other, exits non-zero; the
  other pod's ranks fail their next collective; the operator sees the restart and replaces
  the whole group.
- stop: SIGSTOP. Nothing exits: the stopped rank stops answering its pod's probe and the
  others' collectives hang; the watchdog fails liveness after stallTimeoutSeconds, the pod's
  container is restarted, and the operator replaces the group.

"Serving again" is the first completion answered by the new group (pod 0 replaced) after the
fault; also reported: when status first said Degraded, and the plan version before and after.
Each trial deploys afresh, so that none waits for the backoff of replacements in a row.
Only the API server, the pods' HTTP endpoints and /proc are used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from moe_local import install
from moe_local.cluster import LocalCluster, LocalClusterConfig
from moe_local.controlplane import ensure_binaries
from moe_local.load import complete_once

NS, NAME, PODS, PER_POD = "measure", "m", 2, 2
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "moe-ep.io/v1alpha1",
    "kind": "MoEDeployment",
    "metadata": {"name": NAME},
    "spec": {
        "model": {"layers": 2, "expertsPerLayer": 8, "hiddenSize": 32, "ffnHiddenSize": 64,
                  "attentionHeads": 2, "headDim": 16, "topK": 2, "dtype": "float32"},
        "parallelism": {"expert": PODS * PER_POD},
        "placement": {"slotsPerRank": 2},
        "worker": {"gpusPerPod": 0, "ranksPerPod": PER_POD, "backend": "gloo", "device": "cpu",
                   "stallTimeoutSeconds": 5, "collectiveTimeoutSeconds": 30,
                   "masterPort": 29611,  # apart from other local clusters' stores on 29500
                   "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}]},
    },
}  # fmt: skip


class Measure:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def kubectl(self, *args: str, stdin: str | None = None) -> Any:
        return install.kubectl(self.cluster.kubeconfig, *args, stdin=stdin)

    def get(self, *args: str) -> dict[str, Any] | None:
        return install.get_json(self.cluster.kubeconfig, *args)

    def status(self) -> dict[str, Any]:
        return (self.get("moed", NAME, "-n", NS) or {}).get("status") or {}

    def pods(self) -> dict[str, dict[str, Any]]:
        found = self.get("pods", "-n", NS, "-l", f"moe-ep.io/deployment={NAME}") or {}
        out = {}
        for pod in found.get("items") or []:
            container = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
            cid = container.get("containerID") or ""
            out[pod["metadata"]["name"]] = {
                "uid": pod["metadata"]["uid"],
                "ready": bool(container.get("ready")) and not pod["metadata"].get(
                    "deletionTimestamp"),
                "pid": int(cid.removeprefix("local://")) if cid.startswith("local://") else None,
                "ip": (pod.get("status") or {}).get("podIP"),
            }  # fmt: skip
        return out

    def serving(self) -> dict[str, dict[str, Any]] | None:
        pods = self.pods()
        ok = len(pods) == PODS and all(p["ready"] and p["pid"] for p in pods.values())
        return pods if ok and self.status().get("phase") == "Running" else None

    def gone(self) -> bool:
        """The deployment's StatefulSet and pods are deleted."""
        return not self.pods() and self.get("statefulset", NAME, "-n", NS) is None

    def leader_version(self, pods: dict[str, dict[str, Any]]) -> int | None:
        try:
            url = f"http://{pods[f'{NAME}-0']['ip']}:8080/v1/plan"
            with NO_PROXY.open(url, timeout=3) as response:
                return int(json.loads(response.read())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def ranks_of(launcher: int) -> list[int]:
    """The rank processes a pod's launcher started (its children), by pid."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def answers(ip: str) -> bool:
    body = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2}
    try:
        code, _ = complete_once(f"http://{ip}:8000/v1", body, timeout=2)
    except OSError:
        return False
    return code == 200


def wait(what: str, predicate: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def trial(m: Measure, sig: signal.Signals, timeout: float) -> dict[str, Any]:
    before = wait("the group serving", m.serving, 240)
    wait("a completion", lambda: answers(before[f"{NAME}-0"]["ip"]), 60)
    version = m.leader_version(before)
    victim = ranks_of(before[f"{NAME}-1"]["pid"])[-1]  # global rank 3
    started = time.monotonic()
    os.kill(victim, sig)
    degraded_at = replaced_at = served_at = None
    try:
        while time.monotonic() - started < timeout:
            if degraded_at is None and m.status().get("phase") == "Degraded":
                degraded_at = time.monotonic() - started
            pods = m.pods()
            leader = pods.get(f"{NAME}-0") or {}
            new = leader.get("uid") not in (None, before[f"{NAME}-0"]["uid"])
            if new and replaced_at is None:
                replaced_at = time.monotonic() - started
            if new and leader.get("ip") and answers(leader["ip"]):
                served_at = time.monotonic() - started
                break
            time.sleep(0.25)
    finally:
        if sig == signal.SIGSTOP:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
    after = wait("the group Running", m.serving, 120) if served_at is not None else m.pods()
    return {
        "signal": sig.name,
        "seconds_to_serving": None if served_at is None else round(served_at, 1),
        "seconds_to_degraded_status": None if degraded_at is None else round(degraded_at, 1),
        "seconds_to_new_pods": None if replaced_at is None else round(replaced_at, 1),
        "plan_version_before": version,
        "plan_version_after": m.leader_version(after),
        "pods_replaced": sorted(n for n, p in after.items() if p["uid"] != before[n]["uid"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="of each fault")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per trial")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moe-rank-failure-"))
    cluster = LocalCluster(LocalClusterConfig(workdir=workdir, bin_dir=ensure_binaries(), gpus=8))
    results: dict[str, Any] = {"trials": []}
    cluster.up()
    try:
        m = Measure(cluster)
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        cluster.create_namespace(NS)
        install.helm_install(cluster.kubeconfig, install.operator_values(timer_seconds=1))
        install.wait_until(lambda: install.operator_ready(cluster.kubeconfig), 120, "operator")
        for sig in [signal.SIGKILL, signal.SIGSTOP] * args.trials:
            # A fresh deployment per trial: one failure's recovery, not the backoff that
            # replacements in a row of one deployment earn (status.recovery).
            m.kubectl("apply", "-n", NS, "-f", "-", stdin=json.dumps(DEPLOYMENT))
            try:
                result = trial(m, sig, args.timeout)
            except Exception as error:  # a trial that cannot finish is a result too
                result = {"signal": sig.name, "error": f"{type(error).__name__}: {error}"}
            m.kubectl("delete", "moed", NAME, "-n", NS, "--wait=true", "--timeout=120s")
            wait("the previous group gone", m.gone, 120)  # else the next one meets its children
            results["trials"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        results["processes_left"] = cluster.down()
    for sig in ("SIGKILL", "SIGSTOP"):
        times = [t["seconds_to_serving"] for t in results["trials"]
                 if t["signal"] == sig and t.get("seconds_to_serving") is not None]  # fmt: skip
        if times:
            results[sig] = {"median_s": statistics.median(times), "min_s": min(times),
                            "max_s": max(times), "n": len(times)}  # fmt: skip
            print(f"{sig}: {results[sig]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
