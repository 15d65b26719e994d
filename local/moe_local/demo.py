"""`moe-ep demo`: the whole loop on one machine, with a live table, then a summary.

Brings the local cluster up (real control plane, node agent, Prometheus with the project's rules),
installs the operator with the Helm chart, applies a MoEDeployment of CPU workers whose traffic
favours a few experts, and follows it: workers ready, per-layer imbalance, the
`MoEExpertLoadImbalance` alert, the rebalance, imbalance and throughput after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_local import install
from moe_local.cluster import LocalCluster, LocalClusterConfig, default_workdir

NAMESPACE = "demo"
NAME = "demo"
ALERT = "MoEExpertLoadImbalance"


def demo_deployment(workers: int, zipf: float) -> dict[str, Any]:
    """Small shapes, gloo on CPU, spare slots (so Auto means the output-preserving Replace)."""
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {
                "layers": 4,
                "expertsPerLayer": workers,
                "hiddenSize": 64,
                "ffnHiddenSize": 128,
                "attentionHeads": 4,
                "headDim": 16,
                "topK": 2,
                "dtype": "float32",
            },
            "parallelism": {"expert": workers},
            "placement": {"slotsPerRank": 2},
            "rebalancing": {
                "imbalanceThreshold": 1.3,
                "evaluationWindowSeconds": 10,
                "consecutiveEvaluations": 3,
                "cooldownSeconds": 30,
            },
            "worker": {
                "backend": "gloo",
                "device": "cpu",
                "gpusPerPod": 1,
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "extraArgs": [
                    "--traffic-batch",
                    "2",
                    "--traffic-seq-len",
                    "32",
                    "--zipf",
                    str(zipf),
                    "--traffic-interval",
                    "0.05",
                ],
            },
        },
    }


@dataclass
class Observation:
    elapsed: float
    ready: str = "0/0"
    phase: str = "-"
    plan: str = "-"
    imbalance: str = "-"
    alert: str = "inactive"
    tokens_per_s: float | None = None
    status: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        rate = "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"
        return (
            f"{self.elapsed:6.0f}s  {self.ready:>6}  {self.phase:<11}  {self.plan:>7}  "
            f"{self.imbalance:>9}  {self.alert:<8}  {rate:>9}"
        )


HEADER = "  time   ready  phase           plan  imbalance  alert     tokens/s"


def _prometheus(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(f"{url}{path}{query}", timeout=5) as response:
            return json.load(response).get("data")
    except (OSError, ValueError):
        return None


def _alert_state(url: str) -> str:
    data = _prometheus(url, "/api/v1/alerts") or {}
    states = {
        a["state"]
        for a in data.get("alerts", [])
        if a["labels"].get("alertname") == ALERT and a["labels"].get("moedeployment") == NAME
    }
    return "firing" if "firing" in states else ("pending" if "pending" in states else "inactive")


def _tokens_per_second(url: str) -> float | None:
    query = f'sum(rate(moe_tokens_processed_total{{moedeployment="{NAME}"}}[20s]))'
    data = _prometheus(url, "/api/v1/query", query=query) or {}
    results = data.get("result") or []
    return float(results[0]["value"][1]) if results else None


def observe(kubeconfig: Path, prometheus_url: str, started: float) -> Observation:
    obj = install.get_json(kubeconfig, "moed", NAME, "-n", NAMESPACE) or {}
    status = obj.get("status") or {}
    plan = status.get("plan") or {}
    return Observation(
        elapsed=time.monotonic() - started,
        ready=status.get("ready", "0/0"),
        phase=status.get("phase", "-"),
        plan=f"{plan.get('appliedVersion', 0)}/{plan.get('version', 0)}",
        imbalance=status.get("imbalance", "-"),
        alert=_alert_state(prometheus_url),
        tokens_per_s=_tokens_per_second(prometheus_url),
        status=status,
    )


def _restarts(kubeconfig: Path) -> int:
    pods = install.get_json(
        kubeconfig, "pods", "-n", NAMESPACE, "-l", f"moe-ep.io/deployment={NAME}"
    ) or {"items": []}
    return sum(
        status.get("restartCount", 0)
        for pod in pods["items"]
        for status in (pod.get("status") or {}).get("containerStatuses") or []
    )


def follow(kubeconfig: Path, prometheus_url: str, timeout: float) -> dict[str, Any]:
    """Print a row every few seconds until the loop has gone round; return the milestones."""
    started, milestones = time.monotonic(), {}
    print(HEADER, flush=True)
    last_row, previous = "", None
    while time.monotonic() - started < timeout:
        try:
            now = observe(kubeconfig, prometheus_url, started)
        except RuntimeError as error:  # a slow API server on a busy machine: try again
            print(f"  (could not read status: {error})", flush=True)
            time.sleep(3)
            continue
        if now.row()[8:] != last_row or int(now.elapsed) % 15 == 0:
            print(now.row(), flush=True)
            last_row = now.row()[8:]
        workers = now.ready.split("/")
        if workers[0] == workers[1] != "0":
            milestones.setdefault("ready", now)
        if now.alert == "firing":
            milestones.setdefault("alert", now)
        record = now.status.get("lastRebalance")
        if record and "ready" in milestones and "rebalanced" not in milestones:
            milestones["rebalanced"] = now
            milestones["before"] = previous  # the last row measured on the old plan
        if (
            "rebalanced" in milestones
            and now.alert == "inactive"
            and now.status.get("phase") == "Running"
            and now.elapsed - milestones["rebalanced"].elapsed > 30
        ):
            milestones["after"] = now
            break
        previous = now
        time.sleep(3)
    return milestones


def summarise(milestones: dict[str, Any], restarts: int) -> str:
    def at(key: str) -> str:
        return f"{milestones[key].elapsed:.0f}s" if key in milestones else "not reached"

    before, after = milestones.get("before"), milestones.get("after")
    record = (after or milestones.get("rebalanced") or Observation(0)).status.get(
        "lastRebalance"
    ) or {}
    lines = [
        "moe-ep demo summary",
        f"  workers ready at          {at('ready')}",
        f"  imbalance alert firing at {at('alert')}",
        f"  rebalanced at             {at('rebalanced')}"
        f" ({record.get('method', '-')}, {record.get('slotsMoved', 0)} slots moved, "
        f"plan {record.get('fromVersion', '-')} -> {record.get('toVersion', '-')})",
        f"  imbalance before -> after {before.imbalance if before else '-'} -> "
        f"{after.imbalance if after else '-'} (planner predicted "
        f"{record.get('imbalanceBefore', 0):.2f} -> {record.get('imbalanceAfter', 0):.2f})",
        f"  tokens/s before -> after  {_rate(before)} -> {_rate(after)}",
        "    (every rank shares this machine's cores, so balance moves work between processes",
        "     on the same CPUs and cannot raise throughput as it does with a GPU per rank)",
        f"  predicted throughput gain x{record.get('predictedThroughputGain', 1.0):.2f} "
        "(performance model, cpu-local profile)",
        f"  alert resolved            {'yes' if after and after.alert == 'inactive' else 'no'}",
        f"  worker restarts           {restarts}",
    ]
    return "\n".join(lines)


def _rate(observation: Observation | None) -> str:
    if observation is None or observation.tokens_per_s is None:
        return "-"
    return f"{observation.tokens_per_s:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ep demo", description=__doc__)
    parser.add_argument("--workers", type=int, default=16, help="worker pods (ranks)")
    parser.add_argument("--zipf", type=float, default=1.2, help="expert popularity skew")
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--timeout", type=float, default=420, help="seconds to follow the loop")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    cluster = LocalCluster(
        LocalClusterConfig(
            workdir=args.workdir, gpus=args.workers, prometheus=True, alert_for="15s"
        )
    )
    step = _Steps()
    step("starting the local cluster (control plane, node agent, Prometheus)")
    state = cluster.up(detach=args.keep)
    kubeconfig, prometheus_url = cluster.kubeconfig, state["prometheus"]["url"]
    try:
        step("installing the CRD and the operator with the Helm chart")
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        install.helm_install(kubeconfig, install.operator_values(timer_seconds=2))
        install.wait_until(lambda: install.operator_ready(kubeconfig), 120, "the operator")
        step(f"applying MoEDeployment {NAME}: {args.workers} CPU workers, Zipf skew {args.zipf}")
        cluster.create_namespace(NAMESPACE)
        install.apply_document(kubeconfig, NAMESPACE, demo_deployment(args.workers, args.zipf))
        milestones = follow(kubeconfig, prometheus_url, args.timeout)
        print()
        print(summarise(milestones, _restarts(kubeconfig)), flush=True)
        ok = "after" in milestones
    finally:
        if args.keep:
            print(f"\ncluster kept: export KUBECONFIG={kubeconfig}; moe-ep local down to stop")
        else:
            step("tearing down")
            left = cluster.down()
            if left:
                print(f"processes left behind: {left}", file=sys.stderr)
    return 0 if ok else 1


class _Steps:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f}s] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
