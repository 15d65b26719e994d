"""`moe-ep plan`: preview a rebalancing plan from a load file.

    moe-ep plan --loads LOADS.json --ranks R --slots-per-rank S [--max-slots-per-rank M]
                [--ranks-per-pod P] [--previous PLAN.json]
                [--method auto|replace|round-robin|gating-bias]
                [--rate Y --max-bias X --damping D --max-margin G|none
                 --max-rerouted-fraction C|none --rerouted F0,F1,...]
                [--min-gain-fraction F | --min-gain-per-move G]

LOADS.json is `{"expert_load": [[...E numbers...] x L]}`; --rerouted gives, per layer, the
fraction of top-K assignments the current bias rerouted (the workers' measurement). With
--ranks-per-pod (the deployment's worker.ranksPerPod) the plan routes tokens by pod and the
summary gives the predicted fraction of top-K assignments that leave their pod, before and after.
Prints the plan document the workers accept on stdout and a one-line summary on stderr (with the
planner's time). Exit 0 on success, 2 on bad input (the message names the file and field).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from moe_contract.plan import Plan, PlanError, parse_plan
from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.placement import LoadError, check_loads
from moe_operator.planning.planners import (
    AUTO,
    GATING_BIAS,
    REPLACE,
    ROUND_ROBIN,
    PlanningError,
    plan_rebalance,
)
from moe_operator.planning.replace import ReplaceOptions

METHOD_NAMES = {
    "auto": AUTO,
    "replace": REPLACE,
    "round-robin": ROUND_ROBIN,
    "gating-bias": GATING_BIAS,
}
EXIT_USAGE = 2


class InputError(Exception):
    """Bad input; the message is printed as is."""


def build_parser() -> argparse.ArgumentParser:
    defaults_gating, defaults_replace = GatingOptions(), ReplaceOptions()
    parser = argparse.ArgumentParser(
        prog="moe-ep plan",
        description="Compute the next expert placement / gate bias from per-expert token loads.",
    )
    parser.add_argument("--loads", required=True, type=Path, help="LOADS.json: {expert_load: LxE}")
    parser.add_argument("--ranks", required=True, type=int, help="world size R (EP ranks)")
    parser.add_argument("--slots-per-rank", required=True, type=int, help="expert slots per rank")
    parser.add_argument("--previous", type=Path, help="the plan the workers serve (JSON)")
    parser.add_argument("--method", choices=sorted(METHOD_NAMES), default="auto")
    parser.add_argument(
        "--max-slots-per-rank",
        type=int,
        help="slots per rank the ranks have memory for (default: --slots-per-rank)",
    )
    parser.add_argument(
        "--max-bias", type=float, default=defaults_gating.max_bias, help="GatingBias bound"
    )
    parser.add_argument(
        "--rate", type=float, default=defaults_gating.rate, help="GatingBias step (x 1/E)"
    )
    parser.add_argument(
        "--damping", type=float, default=defaults_gating.damping, help="GatingBias leak"
    )
    parser.add_argument(
        "--max-margin",
        type=_optional_float,
        default=defaults_gating.max_margin,
        help="GatingBias guard: bias only tokens whose top-K choice is this close (or none)",
    )
    parser.add_argument(
        "--max-rerouted-fraction",
        type=_optional_float,
        default=defaults_gating.max_rerouted_fraction,
        help="GatingBias price cap (or none)",
    )
    parser.add_argument(
        "--rerouted",
        type=_fractions,
        help="measured rerouted fraction per layer, comma-separated",
    )
    parser.add_argument(
        "--ranks-per-pod",
        type=int,
        help="ranks of one pod (worker.ranksPerPod): route and place by pod",
    )
    price = parser.add_mutually_exclusive_group()
    price.add_argument(
        "--min-gain-fraction",
        type=float,
        default=defaults_replace.min_gain_fraction,
        help="Replace: the share (ln) of a layer's remaining gap moving all its slots must cut",
    )
    price.add_argument(
        "--min-gain-per-move",
        type=float,
        help="Replace: an absolute price instead, imbalance a layer must gain per slot moved",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `moe-ep plan`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        loads = _read_loads(args.loads)
        previous = _read_plan(args.previous) if args.previous else None
        started = time.perf_counter()
        result = plan_rebalance(
            loads,
            world_size=args.ranks,
            slots_per_rank=args.slots_per_rank,
            previous=previous,
            method=METHOD_NAMES[args.method],
            replace_options=ReplaceOptions(
                min_gain_fraction=args.min_gain_fraction, min_gain_per_move=args.min_gain_per_move
            ),
            gating_options=GatingOptions(
                rate=args.rate,
                max_bias=args.max_bias,
                damping=args.damping,
                max_margin=args.max_margin,
                max_rerouted_fraction=args.max_rerouted_fraction,
            ),
            max_slots_per_rank=args.max_slots_per_rank,
            rerouted_fraction=args.rerouted,
            ranks_per_pod=args.ranks_per_pod,
        )
        seconds = time.perf_counter() - started
    except (InputError, PlanningError, ValueError) as error:
        print(f"moe-ep plan: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(result.plan.to_json())
    print(f"{result.summary()} [planned in {seconds:.2f} s]", file=sys.stderr)
    return 0


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def _fractions(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise InputError(f"{what} {path}: cannot read: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{what} {path}: not JSON: {error}") from None


def _read_loads(path: Path) -> Any:
    document = _read_json(path, "--loads")
    if not isinstance(document, dict) or "expert_load" not in document:
        raise InputError(f'--loads {path}: expert_load: missing; expected {{"expert_load": LxE}}')
    try:
        return check_loads(document["expert_load"])
    except LoadError as error:
        raise InputError(f"--loads {path}: {error}") from None


def _read_plan(path: Path) -> Plan:
    document = _read_json(path, "--previous")
    if not isinstance(document, dict):
        raise InputError(f"--previous {path}: must be a JSON object (a plan document)")
    try:
        return parse_plan(document)
    except PlanError as error:
        raise InputError(f"--previous {path}: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
