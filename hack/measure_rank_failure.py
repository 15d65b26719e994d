#!/usr/bin/env python3
"""Issues 12 and 22: from one failed rank to serving again, on the local cluster.

    python hack/measure_rank_failure.py [--trials 3] [--json out.json]

Starts the local cluster (real control plane, node agent), installs the chart, deploys 2 CPU
pods of 2 ranks each (gloo, world 4, a small synthetic model, 8 experts in 2 slots per rank,
room for 4 per rank: `maxSlotsPerRank` 4, stallTimeoutSeconds 5), and, for each trial, hurts
one rank process of pod 1 (a child of the pod's launcher) while 3 clients keep asking the
leader's API for completions:

- kill: SIGKILL. The pod's launcher sees its rank die, stops the other and exits non-zero (a pod
  is one failure domain). The survivors (pod 0) drop both ranks at once (a collective failed,
  and the operator tells the leader), serve every expert (the lost pod's orphans in spare
  slots, read from the checkpoint) and resume the lost requests; the kubelet restarts pod 1's
  container, whose ranks rejoin and get their experts back point to point.
- stop: SIGSTOP. Nothing exits: the leader drops the stopped rank when its heartbeat has been
  silent for the heartbeat timeout (5 s); the others serve on; the pod's probe fails after
  stallTimeoutSeconds, its container is restarted and its ranks rejoin.

Reported per trial: seconds from the fault to the next completed request, requests failed,
whether a survivor (pod 0) restarted, seconds until status said Degraded, until the whole group
served again (status.membership: every rank live, Running), and the plan version before and
after. Workers that restart whole on any loss (before issue 22) are measured the same way.
Each trial deploys afresh. Only the API server, the pods' HTTP endpoints and /proc are used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import tempfile
import threading
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
        "placement": {"slotsPerRank": 2, "maxSlotsPerRank": 4},
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


def answers(ip: str, timeout: float = 2) -> bool:
    body = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2}
    try:
        code, _ = complete_once(f"http://{ip}:8000/v1", body, timeout=timeout)
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


class Clients:
    """A few clients asking the leader for completions until stopped: (sent, ended, ok)."""

    def __init__(self, m: Measure, count: int = 3) -> None:
        self.m, self.done, self.stop = m, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        ip = None
        while not self.stop.is_set():
            if ip is None:  # the leader's address (a new pod after a whole-group restart)
                ip = (self.m.pods().get(f"{NAME}-0") or {}).get("ip")
            sent = time.monotonic()
            ok = ip is not None and answers(ip, timeout=60)
            self.done.append((sent, time.monotonic(), ok))
            if not ok:
                ip = None
                time.sleep(0.25)

    def finish(self) -> list[tuple[float, float, bool]]:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)
        return self.done


def trial(m: Measure, sig: signal.Signals, timeout: float) -> dict[str, Any]:
    before = wait("the group serving", m.serving, 240)
    wait("a completion", lambda: answers(before[f"{NAME}-0"]["ip"]), 60)
    version = m.leader_version(before)
    victim = ranks_of(before[f"{NAME}-1"]["pid"])[-1]  # global rank 3
    clients = Clients(m)
    time.sleep(2)
    started = time.monotonic()
    os.kill(victim, sig)
    degraded_at = whole_at = None
    try:
        while time.monotonic() - started < timeout:
            status = m.status()
            if degraded_at is None and status.get("phase") == "Degraded":
                degraded_at = time.monotonic() - started
            group = status.get("membership") or {}
            full = len(group.get("liveRanks") or []) == PODS * PER_POD and group.get(
                "state") == "Serving"  # fmt: skip
            replaced = (m.pods().get(f"{NAME}-0") or {}).get("uid") != before[f"{NAME}-0"]["uid"]
            if degraded_at is not None and status.get("phase") == "Running" and (full or replaced):
                whole_at = time.monotonic() - started
                break
            time.sleep(0.25)
    finally:
        if sig == signal.SIGSTOP:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        done = clients.finish()
    after = wait("the group Running", m.serving, 120) if whole_at is not None else m.pods()
    served = sorted(ended for sent, ended, ok in done if ok and ended > started)
    survivor = after.get(f"{NAME}-0") or {}
    return {
        "signal": sig.name,
        "seconds_to_serving": None if not served else round(served[0] - started, 1),
        "requests_failed": sum(not ok for sent, ended, ok in done if ended > started),
        "requests_answered": sum(ok for sent, ended, ok in done if ended > started),
        "survivors_restarted": survivor.get("uid") != before[f"{NAME}-0"]["uid"]
        or survivor.get("pid") != before[f"{NAME}-0"]["pid"],
        "seconds_to_degraded_status": None if degraded_at is None else round(degraded_at, 1),
        "seconds_to_whole_group": None if whole_at is None else round(whole_at, 1),
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
        trials = [t for t in results["trials"] if t["signal"] == sig]
        times = [t["seconds_to_serving"] for t in trials if t.get("seconds_to_serving") is not None]
        whole = [t["seconds_to_whole_group"] for t in trials if t.get("seconds_to_whole_group")]
        if times:
            results[sig] = {"median_s": statistics.median(times), "min_s": min(times),
                            "max_s": max(times), "n": len(times),
                            "whole_median_s": statistics.median(whole) if whole else None,
                            "failed": sum(t.get("requests_failed", 0) for t in trials),
                            "survivors_restarted": sum(bool(t.get("survivors_restarted"))
                                                       for t in trials)}  # fmt: skip
            print(f"{sig}: {results[sig]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
