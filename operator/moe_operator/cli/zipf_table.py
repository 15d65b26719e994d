"""Imbalance before and after Auto rebalancing under Zipf-skewed loads (for the docs).

    moe-ep zipf-table [--ranks 16] [--layers 16] [--experts 16]

Load of expert e in layer l is proportional to 1 / (p_l(e) + 1) ** s, where p_l is a permutation
of the experts (popularity order) fixed per layer by a seeded generator, so layers differ but
every run prints the same table. "Before" is the round-robin plan (seed section 5.1); "after" is one
`plan_rebalance(method="Auto")` step with the default options.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from moe_operator.planning.planners import AUTO, GATING_BIAS, plan_rebalance

TOKENS_PER_LAYER = 128 * 10_000 * 2
"""Seed batch (128 x 10,000 tokens) with top-2 routing: token-expert pairs per layer."""


def zipf_loads(
    num_layers: int, num_experts: int, exponent: float, seed: int = 0
) -> tuple[tuple[float, ...], ...]:
    """Zipf-skewed loads, popularity order permuted per layer deterministically.

    Returns:
        expert_load [L][E], each layer summing to TOKENS_PER_LAYER.
    """
    weights = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    scale = TOKENS_PER_LAYER / sum(weights)
    layers = []
    for layer in range(num_layers):
        popularity = list(range(num_experts))
        random.Random(seed * 100_003 + layer).shuffle(popularity)
        layers.append(tuple(weights[popularity[e]] * scale for e in range(num_experts)))
    return tuple(layers)


@dataclass(frozen=True)
class Row:
    exponent: float
    slots_per_rank: int
    before: float
    after: float | None
    """None where the method's effect is not predicted (GatingBias)."""
    slots_moved: int
    method: str


def zipf_rows(
    exponents: tuple[float, ...] = (0.5, 1.0, 1.5),
    slots_per_rank: tuple[int, ...] = (1, 2, 3),
    *,
    ranks: int = 16,
    layers: int = 16,
    experts: int = 16,
) -> list[Row]:
    """One Auto step per (exponent, slotsPerRank) from the round-robin plan."""
    rows = []
    for exponent in exponents:
        loads = zipf_loads(layers, experts, exponent)
        for slots in slots_per_rank:
            result = plan_rebalance(loads, world_size=ranks, slots_per_rank=slots, method=AUTO)
            after = None if result.method == GATING_BIAS else result.imbalance_after
            rows.append(
                Row(
                    exponent,
                    slots,
                    result.imbalance_before,
                    after,
                    result.slots_moved,
                    result.method,
                )
            )
    return rows


def format_table(rows: list[Row], ranks: int, layers: int) -> str:
    """A Markdown table; imbalance is the worst layer's max/mean rank load."""
    total = f"of {layers * ranks} x S"
    lines = [
        f"| Zipf s | slotsPerRank | imbalance before (round-robin) | after | slots moved ({total}) "
        "| method (Auto) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        after = "not predicted (bias applied)" if row.after is None else f"{row.after:.2f}"
        lines.append(
            f"| {row.exponent:g} | {row.slots_per_rank} | {row.before:.2f} | {after} "
            f"| {row.slots_moved} | {row.method} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ep zipf-table")
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args(argv)
    rows = zipf_rows(ranks=args.ranks, layers=args.layers, experts=args.experts)
    print(format_table(rows, args.ranks, args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
