"""One rank's expert-parallel engine: the replicated dense model, its expert shard, the dispatcher,
and the collective plan switch that moves expert weights rank to rank.

Every method that communicates is collective: all ranks call it at the same step, in the same order
(the runtime's control broadcast guarantees that). No HTTP or metrics code here.

Legend: B sequences, T tokens per sequence, N tokens, D hidden, L layers, E experts,
S slots per rank.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from moe_worker.dispatch import Placement, make_dispatcher
from moe_worker.model import (
    ExpertSource,
    ExpertWeights,
    Routing,
    build_transformer,
    expert_mlp,
    torch_dtype,
)
from moe_worker.plan import Plan, Transfer, plan_transfers
from moe_worker.shape import ModelShape

Shard = list[list[ExpertWeights]]
"""shard[layer][slot]: the weights held by this rank's slots."""


class EPEngine:
    """The model as served by one rank under expert parallelism; callable as the model's MoEFn."""

    def __init__(
        self,
        config: ModelShape,
        plan: Plan,
        *,
        rank: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        checkpoint: str | None = None,
    ) -> None:
        self.config, self.rank, self.device = config, rank, torch.device(device)
        self.dtype = torch_dtype(config)
        self.model = build_transformer(config, seed, self.device, checkpoint)
        source = ExpertSource(config, seed, checkpoint)
        self.shard: Shard = [
            [source.load(layer, e).to(self.device, self.dtype) for e in plan.slots[layer][rank]]
            for layer in range(config.layers)
        ]
        self.dispatcher = make_dispatcher(
            Placement.from_plan(plan, rank, config.experts), config.layers, config.experts
        )
        self.plan = plan
        self.gate_bias_LE = self._gate_bias(plan)
        # Wall time (CPU clock; on CUDA without syncs it is launch time) for the benchmark's FLOP/s.
        self.expert_seconds = self.moe_seconds = 0.0
        self.expert_tokens = 0

    @property
    def counts_LE(self) -> Tensor:
        return self.dispatcher.counts_LE

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor:
        start = time.perf_counter()
        chunks, meta = self.dispatcher.dispatch(layer, x_ND, routing.topk_ids_NK)
        experts_start = time.perf_counter()
        outputs = [expert_mlp(x, self.shard[layer][slot]) for slot, x in enumerate(chunks)]
        self.expert_tokens += sum(x.shape[0] for x in chunks)
        self.expert_seconds += time.perf_counter() - experts_start
        y_ND = self.dispatcher.combine(outputs, meta, routing.topk_weights_NK)
        self.moe_seconds += time.perf_counter() - start
        return y_ND

    def reset_timers(self) -> None:
        self.expert_seconds = self.moe_seconds = 0.0
        self.expert_tokens = 0

    @torch.no_grad()
    def forward(self, x_BTD: Tensor, logit_offset_E: Tensor | None = None) -> Tensor:
        """Collective: every rank calls it once per step with its own sequences (maybe none)."""
        x_BTD = x_BTD.to(self.device, self.dtype)
        offset = None if logit_offset_E is None else logit_offset_E.to(self.device, self.dtype)
        return self.model(x_BTD, self, self.gate_bias_LE, offset)

    @torch.no_grad()
    def apply_plan(self, plan: Plan) -> None:
        """Collective: switch to `plan`; experts move point-to-point, never re-read or re-made."""
        transfers = plan_transfers(self.plan, plan)
        held = [
            dict(zip(self.plan.slots[layer][self.rank], self.shard[layer], strict=True))
            for layer in range(self.config.layers)
        ]
        received = self._exchange(transfers, held)
        self.shard = [
            [held[layer].get(e) or received[(layer, e)] for e in plan.slots[layer][self.rank]]
            for layer in range(self.config.layers)
        ]
        self.dispatcher.placement = Placement.from_plan(plan, self.rank, self.config.experts)
        self.plan = plan
        self.gate_bias_LE = self._gate_bias(plan)

    def _exchange(
        self, transfers: list[Transfer], held: list[dict[int, ExpertWeights]]
    ) -> dict[tuple[int, int], ExpertWeights]:
        ops: list[dist.P2POp] = []
        buffers: dict[tuple[int, int], Tensor] = {}
        numel = self.config.expert_params
        for t in transfers:
            if t.src == self.rank:
                ops.append(dist.P2POp(dist.isend, held[t.layer][t.expert].flat(), t.dst))
            if t.dst == self.rank:
                buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
                buffers[(t.layer, t.expert)] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, t.src))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return {key: ExpertWeights.from_flat(b, self.config) for key, b in buffers.items()}

    def _gate_bias(self, plan: Plan) -> Tensor | None:
        if plan.gate_bias is None:
            return None
        return torch.tensor(plan.gate_bias, dtype=torch.float32, device=self.device)
