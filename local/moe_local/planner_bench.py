"""`moe-ep planner-bench`: Replace against EPLB at DeepSeek scale, in one process, as tables.

    moe-ep planner-bench [--seed 0] [--repeat 3] [--ranks-per-pod 8] [--reference-layers 1]

Loads: lognormal expert loads (sigma 1, the skew of real routers' popularity), one matrix per
size and seed. Sizes: 16 x 16 on 16 ranks (the seed, 2 slots per rank), DeepSeek-V3's 58 x 256
on 64, 72 and 144 ranks, Qwen3-235B's 94 x 128 on 64 ranks; slots per rank hold every expert
and about 32 redundant ones (as DeepSeek serves). Times are the best of --repeat runs on this
machine of `plan_rebalance` (what `moe-ep plan` and the operator run: loads checked, plan built,
moves counted) and of `moe_local.eplb`.

1. From the round-robin start: time, imbalance (worst layer / mean over layers) and the ideal
   (the least the slots allow).
2. A +-20% drift (every expert's load times uniform(0.8, 1.2)) from the plan Replace made for
   the first loads: imbalance before, EPLB's (which plans from scratch; its moves counted after
   renumbering its ranks to the previous plan's, in its favour) and Replace's, with moves.
3. Pods of --ranks-per-pod ranks: the fraction of top-K assignments that leave their pod and the
   imbalance, for a flat plan served without pods (tokens spread over all replicas), the same
   plan routed by pod, Replace with pods, and EPLB's global and (where the 8 groups of
   DeepSeek-V3 divide among the pods, EPLB's condition) hierarchical plans routed by pod.
4. The reference implementation (`planning.reference`) on --reference-layers layers of the
   58 x 256 case, for the speed it had.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_contract.plan import Plan, round_robin_plan
from moe_local.eplb import eplb_global, eplb_hierarchical
from moe_operator.planning import arrays, reference
from moe_operator.planning.align import align
from moe_operator.planning.planners import REPLACE, plan_rebalance
from moe_operator.planning.replace import ideal_imbalance


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    experts: int
    ranks: int
    redundant: int = 32
    groups: int | None = None
    """The model's expert groups (DeepSeek-V3's n_group), for EPLB's hierarchical policy."""

    @property
    def slots_per_rank(self) -> int:
        return math.ceil((self.experts + self.redundant) / self.ranks)

    def label(self) -> str:
        return f"{self.name} {self.layers}x{self.experts} on {self.ranks} x {self.slots_per_rank}"


SIZES = (
    Size("seed", 16, 16, 16, redundant=16),
    Size("DeepSeek-V3", 58, 256, 64, groups=8),
    Size("DeepSeek-V3", 58, 256, 72, groups=8),
    Size("DeepSeek-V3", 58, 256, 144, groups=8),
    Size("Qwen3-235B", 94, 128, 64),
)


def best_time(repeat: int, function: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def imbalance_of(slots: Any, load: np.ndarray) -> np.ndarray:
    return arrays.imbalances(arrays.rank_loads(np.asarray(slots, dtype=np.int64), load))


def replace(load: np.ndarray, size: Size, previous: Plan | None, pods: int | None = None) -> Any:
    return plan_rebalance(
        load.tolist(),
        world_size=size.ranks,
        slots_per_rank=size.slots_per_rank,
        previous=previous,
        method=REPLACE,
        ranks_per_pod=pods,
    )


def cross_pod(slots: Any, load: np.ndarray, per_pod: int) -> float:
    """Fraction of all layers' assignments that leave their pod when routed by pod."""
    fraction = arrays.cross_pod_fraction(np.asarray(slots, dtype=np.int64), load, per_pod)
    return float((fraction * load.sum(axis=1)).sum() / load.sum())


def _fmt(values: np.ndarray) -> str:
    return f"{values.max():.3f} / {values.mean():.3f}"


def start_table(rows: list[tuple[Size, np.ndarray]], repeat: int) -> list[str]:
    lines = [
        "| size | EPLB s | EPLB imbalance (worst / mean) | Replace s | Replace imbalance "
        "(worst / mean) | ideal (worst / mean) |",
        "|---|---|---|---|---|---|",
    ]
    for size, load in rows:
        eplb_s, eplb = best_time(repeat, eplb_global, load, size.ranks, size.slots_per_rank)
        replace_s, result = best_time(repeat, replace, load, size, None)
        ideal = ideal_imbalance(load, size.ranks, size.slots_per_rank)
        after = np.asarray(result.per_layer_after)
        lines.append(
            f"| {size.label()} | {eplb_s:.3f} | {_fmt(imbalance_of(eplb, load))} | "
            f"{replace_s:.3f} | {_fmt(after)} | {_fmt(ideal)} |"
        )
    return lines


def drift_table(rows: list[tuple[Size, np.ndarray]], seed: int, repeat: int) -> list[str]:
    lines = [
        "| size | before (worst / mean) | EPLB (worst / mean) | EPLB moves (renumbered / as "
        "planned) | Replace (worst / mean) | Replace moves | Replace s |",
        "|---|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(seed + 1)
    for size, load in rows:
        previous = replace(load, size, None).plan
        drifted = load * rng.uniform(0.8, 1.2, load.shape)
        current = np.asarray(previous.slots, dtype=np.int64)
        eplb = eplb_global(drifted, size.ranks, size.slots_per_rank)
        renumbered = arrays.moved_experts(current, align(eplb, current, size.experts)).sum()
        as_planned = arrays.moved_experts(current, eplb).sum()
        replace_s, result = best_time(repeat, replace, drifted, size, previous)
        lines.append(
            f"| {size.label()} | {_fmt(imbalance_of(current, drifted))} | "
            f"{_fmt(imbalance_of(eplb, drifted))} | {renumbered} / {as_planned} | "
            f"{_fmt(np.asarray(result.per_layer_after))} | {result.slots_moved} | "
            f"{replace_s:.3f} |"
        )
    return lines


def pods_table(rows: list[tuple[Size, np.ndarray]], per_pod: int, repeat: int) -> list[str]:
    lines = [
        f"| size ({per_pod} ranks per pod) | placement | routing | leaves its pod | imbalance "
        "(worst / mean) | plan s |",
        "|---|---|---|---|---|---|",
    ]
    for size, load in rows:
        if size.ranks % per_pod or size.ranks == per_pod:
            continue
        pods = size.ranks // per_pod
        flat_s, flat = best_time(repeat, replace, load, size, None)
        hier_s, hier = best_time(repeat, replace, load, size, None, per_pod)
        cases = [
            ("Replace, flat", "spread over all replicas", flat.plan.slots, 1 - 1 / pods, flat_s),
            ("Replace, flat", "by pod", flat.plan.slots, None, flat_s),
            ("Replace, pods", "by pod", hier.plan.slots, None, hier_s),
            ("EPLB global", "by pod", eplb_global(load, size.ranks, size.slots_per_rank), None, 0),
        ]
        groups = size.groups
        if groups is not None and groups % pods == 0:  # EPLB's own condition
            placed = eplb_hierarchical(load, size.ranks, size.slots_per_rank, per_pod, groups)
            cases.append((f"EPLB hierarchical, {groups} groups", "by pod", placed, None, 0))
        for placement, routing, slots, fixed, seconds in cases:
            leaving = cross_pod(slots, load, per_pod) if fixed is None else fixed
            timing = f"{seconds:.3f}" if seconds else "-"
            lines.append(
                f"| {size.label()} | {placement} | {routing} | {leaving:.1%} | "
                f"{_fmt(imbalance_of(slots, load))} | {timing} |"
            )
    return lines


def reference_line(load: np.ndarray, size: Size, layers: int) -> str:
    plan = round_robin_plan(layers, size.experts, size.ranks, size.slots_per_rank)
    started = time.perf_counter()
    for layer in range(layers):
        reference.replace_layer(plan.slots[layer], load[layer].tolist(), reference.ReplaceOptions())
    seconds = (time.perf_counter() - started) / layers
    return (
        f"reference implementation (planning.reference, stdlib): {seconds:.2f} s per layer of "
        f"{size.label()}, {seconds * size.layers:.0f} s for all {size.layers} layers"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-ep planner-bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--ranks-per-pod", type=int, default=8)
    parser.add_argument("--reference-layers", type=int, default=1, help="0: skip the reference")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = [(size, rng.lognormal(0, 1, (size.layers, size.experts)) * 1000) for size in SIZES]
    print("From the round-robin start (time: best of", args.repeat, "runs)\n")
    print("\n".join(start_table(rows, args.repeat)))
    print("\nA +-20% drift from Replace's plan\n")
    print("\n".join(drift_table(rows, args.seed, args.repeat)))
    print(f"\nPods of {args.ranks_per_pod} ranks\n")
    print("\n".join(pods_table(rows, args.ranks_per_pod, 1)))
    if args.reference_layers:
        print()
        print(reference_line(rows[1][1], rows[1][0], args.reference_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
