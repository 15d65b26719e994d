"""Token dispatchers: send each token to the slots holding its experts, and bring the results back.

Strategy objects, not nn.Modules (torchtitan's token_dispatcher): `dispatch()` returns the tokens
grouped per local slot plus frozen `DispatchMeta`, which `combine()` consumes. The two collectives
(`_exchange_counts`, `_exchange_tokens`) are one small method each; `LocalDispatcher` makes them
identities so the same pre/post-processing runs in one process for tests.

Replicas: a logical expert held by several slots gets its tokens split among them by token index
(plus the rank, so ranks with few tokens do not all pick the first replica): deterministic, and
even in expectation.

Legend: N tokens, K top-k, A = N*K assignments, D hidden, E experts, L layers, R ranks,
S slots per rank, G = R*S global slots, M max replicas of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_worker.models.base import weighted_sum
from moe_worker.plan import Plan


@dataclass(frozen=True)
class Placement:
    """A plan as one rank needs it for routing. Immutable; a plan switch builds a new one."""

    rank: int
    world_size: int
    slots_per_rank: int
    replica_slots_LEM: Tensor  # global slot ids of each expert's replicas, padded with -1
    replica_count_LE: Tensor
    local_experts: tuple[tuple[int, ...], ...]  # [L][S] logical expert of each local slot

    @classmethod
    def from_plan(cls, plan: Plan, rank: int, num_experts: int) -> Placement:
        s = plan.slots_per_rank
        layers = []
        for layer in range(plan.num_layers):
            places = plan.replicas(layer)
            layers.append([[r * s + k for r, k in places.get(e, [])] for e in range(num_experts)])
        width = max(len(slots) for layer in layers for slots in layer)
        table = torch.full((plan.num_layers, num_experts, width), -1, dtype=torch.int64)
        count = torch.zeros(plan.num_layers, num_experts, dtype=torch.int64)
        for layer, experts in enumerate(layers):
            for e, slots in enumerate(experts):
                table[layer, e, : len(slots)] = torch.tensor(slots, dtype=torch.int64)
                count[layer, e] = len(slots)
        local = tuple(tuple(plan.slots[layer][rank]) for layer in range(plan.num_layers))
        return cls(rank, plan.world_size, s, table, count, local)

    def slots_for(self, layer: int, topk_ids_NK: Tensor) -> Tensor:
        """Global slot of every assignment [A]: its expert's replica chosen by token index."""
        n, k = topk_ids_NK.shape
        ids_A = topk_ids_NK.reshape(-1).cpu()
        token_A = torch.arange(n).repeat_interleave(k)
        pick_A = (token_A + self.rank) % self.replica_count_LE[layer][ids_A]
        return self.replica_slots_LEM[layer][ids_A, pick_A]


@dataclass(frozen=True)
class DispatchMeta:
    """What combine() needs to undo dispatch() for one layer call."""

    num_tokens: int
    top_k: int
    order_A: Tensor  # permutation sorting assignments by global slot
    send_splits: list[int]  # tokens sent to each rank
    recv_splits: list[int]  # tokens received from each rank
    recv_order: Tensor  # permutation grouping received tokens by local slot
    slot_sizes: list[int]  # tokens for each local slot


class Dispatcher:
    """All-to-all expert-parallel dispatch over the default process group (any backend)."""

    def __init__(self, placement: Placement, num_layers: int, num_experts: int) -> None:
        self.placement = placement
        # Tokens this rank processed per (layer, logical expert); read by /metrics, never reset.
        self.counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def dispatch(
        self, layer: int, x_ND: Tensor, topk_ids_NK: Tensor
    ) -> tuple[list[Tensor], DispatchMeta]:
        """Tokens per local slot ([n_s, D] each) and the metadata to send the results back."""
        p = self.placement
        r, s = p.world_size, p.slots_per_rank
        n, k = topk_ids_NK.shape
        slot_A = p.slots_for(layer, topk_ids_NK)
        order_A = torch.argsort(slot_A, stable=True)
        x_AD = x_ND[(order_A // k).to(x_ND.device)]  # one row per assignment, in slot order
        send_counts_RS = torch.bincount(slot_A, minlength=r * s).view(r, s)
        recv_counts_RS = self._exchange_counts(send_counts_RS)  # [src rank, my slot]
        send_splits = send_counts_RS.sum(1).tolist()
        recv_splits = recv_counts_RS.sum(1).tolist()
        recv_AD = self._exchange_tokens(x_AD, send_splits, recv_splits)
        slot_of_recv = torch.arange(s).repeat(r).repeat_interleave(recv_counts_RS.reshape(-1))
        recv_order = torch.argsort(slot_of_recv, stable=True)
        slot_sizes = recv_counts_RS.sum(0).tolist()
        for slot, size in enumerate(slot_sizes):
            self.counts_LE[layer, p.local_experts[layer][slot]] += size
        chunks = list(recv_AD[recv_order.to(recv_AD.device)].split(slot_sizes))
        meta = DispatchMeta(n, k, order_A, send_splits, recv_splits, recv_order, slot_sizes)
        return chunks, meta

    def combine(self, outputs: list[Tensor], meta: DispatchMeta, topk_weights_NK: Tensor) -> Tensor:
        """Per-slot expert outputs -> [N, D] weighted by the (unbiased) gate weights."""
        grouped = torch.cat(outputs)  # at least one slot per rank, possibly empty
        recv_AD = torch.empty_like(grouped)
        recv_AD[meta.recv_order.to(grouped.device)] = grouped
        sent_AD = self._exchange_tokens(recv_AD, meta.recv_splits, meta.send_splits)
        y_AD = torch.empty_like(sent_AD)
        y_AD[meta.order_A.to(sent_AD.device)] = sent_AD
        y_NKD = y_AD.view(meta.num_tokens, meta.top_k, y_AD.shape[-1])  # N may be 0
        return weighted_sum(y_NKD, topk_weights_NK)

    def _exchange_counts(self, send_counts_RS: Tensor) -> Tensor:
        device = _collective_device()
        recv = torch.empty_like(send_counts_RS, device=device)
        dist.all_to_all_single(recv, send_counts_RS.to(device))
        return recv.cpu()

    def _exchange_tokens(
        self, x_AD: Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Tensor:
        recv = x_AD.new_empty(sum(recv_splits), x_AD.shape[1])
        dist.all_to_all_single(recv, x_AD.contiguous(), recv_splits, send_splits)
        return recv


class LocalDispatcher(Dispatcher):
    """World size 1: the same grouping by slot, no communication."""

    def _exchange_counts(self, send_counts_RS: Tensor) -> Tensor:
        return send_counts_RS

    def _exchange_tokens(
        self, x_AD: Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Tensor:
        return x_AD


def _collective_device() -> torch.device:
    """nccl moves only CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_dispatcher(placement: Placement, num_layers: int, num_experts: int) -> Dispatcher:
    cls = LocalDispatcher if placement.world_size == 1 else Dispatcher
    return cls(placement, num_layers, num_experts)
