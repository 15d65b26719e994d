"""Measure what the GatingBias planner does to load on the seed's layout (16 ranks, 1 slot each).

GatingBias cannot be predicted from loads alone (it changes which experts tokens visit), so this
script measures it: the worker's own router (`moe_worker.model.route`) routes random tokens whose
gate logits carry a Zipf popularity offset (as the worker's traffic source does), and the
operator's own planner (`plan_rebalance`, method GatingBias) updates the bias from the measured
loads, evaluation after evaluation. Prints imbalance (max/mean rank load) before and after.

    python tools/gating_bias_effect.py [--evaluations 20] [--tokens 20000]
"""

from __future__ import annotations

import argparse

import torch

from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.placement import imbalance
from moe_operator.planning.planners import plan_rebalance
from moe_worker.model import route
from moe_worker.plan import round_robin_plan
from moe_worker.traffic import zipf_logit_offset

EXPERTS = RANKS = 16
TOP_K = 2


def measure(
    zipf: float, options: GatingOptions, evaluations: int, tokens: int
) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    offset_E = zipf_logit_offset(EXPERTS, zipf)
    plan = round_robin_plan(1, EXPERTS, RANKS, 1)
    history = []
    for _ in range(evaluations + 1):
        logits_NE = torch.randn(tokens, EXPERTS, generator=generator) + offset_E
        bias = None if plan.gate_bias is None else torch.tensor(plan.gate_bias[0])
        ids_NK = route(logits_NE, TOP_K, bias).topk_ids_NK
        load_E = torch.bincount(ids_NK.flatten(), minlength=EXPERTS).tolist()
        history.append(imbalance(load_E))  # one expert per rank: rank load = expert load
        plan = plan_rebalance(
            [load_E],
            world_size=RANKS,
            slots_per_rank=1,
            previous=plan,
            method="GatingBias",
            gating_options=options,
        ).plan
    return history[0], history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    print(
        f"| Zipf s | rate / maxGateBias | imbalance before | after {args.evaluations} evaluations |"
    )
    print("|---|---|---|---|")
    for zipf in (0.5, 1.0, 1.5):
        for rate, max_bias in ((0.01, 0.1), (0.05, 0.5)):
            before, after = measure(
                zipf, GatingOptions(rate=rate, max_bias=max_bias), args.evaluations, args.tokens
            )
            print(f"| {zipf} | {rate} / {max_bias} | {before:.2f} | {after:.2f} |")


if __name__ == "__main__":
    main()
