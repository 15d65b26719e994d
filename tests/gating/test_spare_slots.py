"""A plan grown into spare memory is output-preserving: replicas split tokens, outputs unchanged.

The operator grows the seed-like layout (4 ranks x 4 experts, 1 slot) to 2 slots per rank with
Replace; the worker's dispatcher then routes the same tokens to the grown placement's replicas.
Every rank's slots are gathered on one process (a single-rank plan holding all of them), so the
dispatcher's replica split runs for real and the combine is compared with the dense one.
"""

from __future__ import annotations

import torch

from moe_contract.plan import Plan, validate_plan
from moe_operator.planning.planners import REPLACE, plan_rebalance
from moe_worker.ep.dispatch import LocalDispatcher, Placement
from moe_worker.models import route

EXPERTS = RANKS = 4


def test_a_grown_replace_plan_changes_no_output() -> None:
    generator = torch.Generator().manual_seed(0)
    skew_E = torch.tensor([2.0, 0.0, 0.0, -1.0])  # expert 0 hot
    logits_NE = torch.randn(400, EXPERTS, generator=generator) + skew_E
    routing = route(logits_NE, 2)
    loads = torch.bincount(routing.topk_ids_NK.flatten(), minlength=EXPERTS).tolist()
    result = plan_rebalance(
        [[float(x) for x in loads]], world_size=RANKS, slots_per_rank=1, max_slots_per_rank=2
    )
    grown = result.plan
    assert result.method == REPLACE and grown.slots_per_rank == 2 and grown.gate_bias is None
    validate_plan(grown, num_layers=1, num_experts=EXPERTS, world_size=RANKS, max_slots_per_rank=2)
    assert result.imbalance_after < result.imbalance_before
    assert len(grown.replicas(0)[0]) >= 2  # the hot expert got a replica

    all_slots = tuple(expert for rank_slots in grown.slots[0] for expert in rank_slots)
    one_rank = Plan(version=1, slotsPerRank=len(all_slots), slots=((all_slots,),))
    dispatcher = LocalDispatcher(Placement.from_plan(one_rank, 0, EXPERTS), 1, EXPERTS)
    x_ND = torch.randn(400, 8, generator=generator)
    grouped_nD, meta = dispatcher.dispatch(0, x_ND, routing.topk_ids_NK)
    chunks = grouped_nD.split(meta.slot_sizes)  # rows of each local slot, slot 0 first
    scale = {expert: float(expert + 1) for expert in range(EXPERTS)}
    outputs = torch.cat([chunk * scale[all_slots[slot]] for slot, chunk in enumerate(chunks)])
    served = dispatcher.combine(outputs, meta, routing.topk_weights_NK)
    scales_NK = routing.topk_ids_NK.float() + 1  # expert e multiplies by e + 1
    dense = x_ND * (routing.topk_weights_NK * scales_NK).sum(-1, keepdim=True)
    torch.testing.assert_close(served, dense)
    used = [chunk.shape[0] > 0 for slot, chunk in enumerate(chunks) if all_slots[slot] == 0]
    assert sum(used) >= 2  # the hot expert's tokens really were split among its replicas
