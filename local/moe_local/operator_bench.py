"""`moe-ep operator-bench`: the operator's control step against many fake ranks, timed and weighed.

    moe-ep operator-bench [--ranks 64,128,256] [--ranks-per-pod 8] [--layers 58]
                          [--experts 256] [--redundant 32] [--seed 0] [--json]

For each world size: a DeepSeek-V3-shaped deployment (58 layers x 256 experts, top-8; pods of
--ranks-per-pod ranks; slots per rank for the experts and --redundant more) whose pods are
`moe_local.fake_ranks` servers in a child process (so the numbers are the operator's own),
serving the round-robin plan under lognormal expert loads. The operator's real
`rebalance.control_step` runs twice, as its timer would: the first read opens the window, the
second evaluates, plans, writes the plan ConfigMap (built as the operator builds it) and hands
the plan to the leader. Printed per size: the step's time and its parts (counter read, planning,
the rest), the process's peak RSS and its growth in the step, Python's peak allocation in the
step (a second run under tracemalloc), the plan ConfigMap's size against Kubernetes' 1 MiB, and
the predicted cross-pod fraction.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import socket
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_contract.plan import Plan, round_robin_plan
from moe_local.fake_ranks import FakeRanks
from moe_operator import rebalance
from moe_operator.api import MoEDeploymentSpec, RebalanceRecord
from moe_operator.manifests import children
from moe_operator.planning import planners
from moe_operator.planning.detection import DetectionState
from moe_operator.validation import parse_spec
from moe_operator.workers import PodWorkers

CONFIGMAP_LIMIT = 1 << 20
"""Kubernetes refuses objects above 1 MiB (etcd's request limit is 1.5 MiB)."""
NAME, NAMESPACE = "deepseek", "bench"


def deepseek_spec(
    ranks: int, per_pod: int, layers: int, experts: int, slots: int, port: int
) -> MoEDeploymentSpec:
    """A DeepSeek-V3-shaped MoEDeployment (CPU fields, so no GPU is asked for)."""
    raw = {
        "model": {
            "layers": layers,
            "expertsPerLayer": experts,
            "hiddenSize": 7168,
            "ffnHiddenSize": 2048,
            "attentionHeads": 128,
            "headDim": 128,
            "topK": 8,
            "dtype": "bfloat16",
        },
        "parallelism": {"expert": ranks},
        "placement": {"slotsPerRank": slots},
        "worker": {
            "backend": "gloo",
            "device": "cpu",
            "gpusPerPod": 0,
            "ranksPerPod": per_pod,
            "port": port,
        },
        "rebalancing": {
            "evaluationWindowSeconds": 30,
            "consecutiveEvaluations": 1,
            "cooldownSeconds": 0,
            "imbalanceThreshold": 1.1,
        },
    }
    spec, problems = parse_spec(raw, NAME)
    if spec is None:
        raise SystemExit(f"moe-ep operator-bench: spec: {problems}")
    return spec


@dataclass
class SizedStore:
    """The plan's durable record as the operator writes it, kept only to be weighed."""

    spec: MoEDeploymentSpec
    configmap_bytes: int = 0
    seconds: float = 0.0

    def write(self, plan: Plan, record: RebalanceRecord | None, issued_at: float) -> None:
        started = time.perf_counter()
        notes = {children.ISSUED_AT_ANNOTATION: repr(issued_at)}
        if record is not None:
            notes[children.LAST_REBALANCE_ANNOTATION] = json.dumps(record.model_dump(by_alias=True))
        key = children.plan_shape(self.spec).key
        configmap = children.build_plan_configmap(NAME, {key: plan}, notes)
        self.configmap_bytes = len(json.dumps(configmap, separators=(",", ":")).encode())
        self.seconds += time.perf_counter() - started


def _timed(function: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    return run


def _serve(plan: Plan, load: list[list[float]], per_pod: int, port: int, ready: Any) -> None:
    FakeRanks(plan, load, per_pod, port).start()
    ready.set()
    time.sleep(3600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(
    ranks: int, per_pod: int, layers: int, experts: int, slots: int, seed: int, trace: bool = False
) -> dict[str, Any]:
    """One deployment's two control steps (see the module); the numbers of the second.
    `trace`: under tracemalloc, for Python's peak allocation (slower: not for the times)."""
    port = free_port()
    spec = deepseek_spec(ranks, per_pod, layers, experts, slots, port)
    plan = round_robin_plan(layers, experts, ranks, slots)
    load = (np.random.default_rng(seed).lognormal(0, 1, (layers, experts)) * 1000).round().tolist()
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_serve, args=(plan, load, per_pod, port, ready), daemon=True)
    child.start()
    try:
        if not ready.wait(60):
            raise SystemExit("moe-ep operator-bench: the fake ranks did not start")
        pods = FakeRanks(plan, load, per_pod, port).pod_objects(NAME)
        workers = PodWorkers(pods, spec, NAMESPACE, NAME, lambda: "token")
        reads: list[float] = []
        plans: list[float] = []
        workers.read_counters = _timed(workers.read_counters, reads)  # type: ignore[method-assign]
        original = rebalance.plan_rebalance
        rebalance.plan_rebalance = _timed(original, plans)  # type: ignore[assignment]
        store = SizedStore(spec)
        state, window = DetectionState(desired_version=1, applied_version=1), rebalance.Window()
        try:
            first = rebalance.control_step(spec, plan, state, window, workers, store, 1000.0)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if trace:
                tracemalloc.start()
            started = time.perf_counter()
            outcome = rebalance.control_step(
                spec, first.desired, first.state, window, workers, store, 1030.0
            )
            step = time.perf_counter() - started
            python_peak = tracemalloc.get_traced_memory()[1] if trace else 0
            tracemalloc.stop()
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        finally:
            rebalance.plan_rebalance = original
        record = outcome.rebalance
        cross = planners.cross_pod(outcome.desired, load, per_pod if per_pod < ranks else None)
        return {
            "ranks": ranks,
            "pods": ranks // per_pod,
            "step_s": step,
            "read_s": reads[-1] if reads else math.nan,
            "plan_s": plans[-1] if plans else math.nan,
            "other_s": step - (reads[-1] if reads else 0) - (plans[-1] if plans else 0),
            "rss_growth_mib": (rss_after - rss_before) / 1024,
            "rss_peak_mib": rss_after / 1024,
            "python_peak_mib": python_peak / 2**20,
            "configmap_kib": store.configmap_bytes / 1024,
            "configmap_of_limit": store.configmap_bytes / CONFIGMAP_LIMIT,
            "imbalance_before": record.imbalance_before if record else None,
            "imbalance_after": record.imbalance_after if record else None,
            "slots_moved": record.slots_moved if record else 0,
            "cross_pod_after": cross,
            "plan_version": outcome.desired.version,
            "problem": outcome.loads_problem or outcome.handoff_problem,
        }
    finally:
        child.kill()
        child.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-ep operator-bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ranks", default="64,128,256", help="world sizes, comma-separated")
    parser.add_argument("--ranks-per-pod", type=int, default=8)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--redundant", type=int, default=32, help="slots beyond one per expert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for ranks in (int(part) for part in args.ranks.split(",")):
        per_pod = min(args.ranks_per_pod, ranks)
        slots = math.ceil((args.experts + args.redundant) / ranks)
        shape = (ranks, per_pod, args.layers, args.experts, slots, args.seed)
        row = measure(*shape)
        row["python_peak_mib"] = measure(*shape, trace=True)["python_peak_mib"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'ranks':>5} {'pods':>4} {'step s':>7} {'read s':>7} {'plan s':>7} {'other s':>7} "
        f"{'RSS MiB':>7} {'+MiB':>5} {'py peak MiB':>11} {'ConfigMap KiB':>13} {'of 1 MiB':>8} "
        f"{'imbalance':>13} {'moved':>6} {'cross-pod':>9}"
    )
    for row in rows:
        before, after = row["imbalance_before"], row["imbalance_after"]
        imbalance = "-" if before is None else f"{before:.2f} -> {after:.2f}"
        cross = "-" if row["cross_pod_after"] is None else f"{row['cross_pod_after']:.1%}"
        print(
            f"{row['ranks']:>5} {row['pods']:>4} {row['step_s']:>7.2f} {row['read_s']:>7.2f} "
            f"{row['plan_s']:>7.2f} {row['other_s']:>7.2f} {row['rss_peak_mib']:>7.0f} "
            f"{row['rss_growth_mib']:>5.0f} "
            f"{row['python_peak_mib']:>11.1f} {row['configmap_kib']:>13.1f} "
            f"{row['configmap_of_limit']:>8.1%} {imbalance:>13} {row['slots_moved']:>6} {cross:>9}"
            + (f"  ({row['problem']})" if row["problem"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
