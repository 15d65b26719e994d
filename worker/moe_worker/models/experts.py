"""The reference MoEFn: every expert of every layer in this process (world size 1).

It is what the expert-parallel engine must equal: same family `expert_forward`, same combine
(`weighted_sum`). It counts routed tokens per (layer, logical expert) as the EP dispatcher does.

Legend: N tokens, K top-k, A = N*K assignments, D hidden, L layers, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_worker.models.base import Architecture, ExpertWeights, Routing, weighted_sum


class LocalExperts:
    """MoEFn over `experts[layer][expert]`; `counts_LE` accumulates tokens routed to each."""

    def __init__(self, arch: Architecture, experts: list[list[ExpertWeights]]) -> None:
        self.arch, self.experts = arch, experts
        self.counts_LE = torch.zeros(len(experts), len(experts[0]), dtype=torch.int64)

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor:
        n, k = routing.topk_ids_NK.shape
        ids_A = routing.topk_ids_NK.reshape(-1)
        order_A = torch.argsort(ids_A, stable=True)  # assignments grouped by expert
        counts_E = torch.bincount(ids_A, minlength=len(self.experts[layer]))
        self.counts_LE[layer] += counts_E.cpu()
        d = x_ND.shape[1]
        y_AD = x_ND.new_empty(n * k, d)
        start = 0
        for expert, count in enumerate(counts_E.tolist()):
            if count:
                rows_A = order_A[start : start + count]
                y_AD[rows_A] = self.arch.expert_forward(
                    x_ND[rows_A // k], self.experts[layer][expert]
                )
                start += count
        return weighted_sum(y_AD.view(n, k, d), routing.topk_weights_NK)  # n may be 0
