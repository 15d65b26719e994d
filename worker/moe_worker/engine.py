"""One rank's expert-parallel engine: the replicated dense model, this rank's expert shard, the
all-to-all dispatcher as the model's MoEFn, and the collective plan switch that moves experts
rank to rank.

The shard holds only the experts the plan's slots give this rank, read from the weight source
(synthetic, or a checkpoint tensor by tensor). A plan switch never re-reads them: every expert a
rank lacks under the new plan comes point to point from a holder, exactly as
`plan.plan_transfers` lists, as one flat buffer per expert.

Every method that communicates is collective: all ranks call it at the same step, in the same order
(the runtime's step descriptor guarantees that). No HTTP or metrics code here.

Legend: N tokens, B sequences, V vocabulary, D hidden, L layers, E experts.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from moe_worker.dispatch import Placement, make_dispatcher
from moe_worker.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models import ExpertWeights, Routing
from moe_worker.plan import Plan, Transfer, plan_transfers
from moe_worker.weights import WeightSource, build_model, load_experts, serving_dtype

Shard = list[dict[int, ExpertWeights]]
"""shard[layer][expert]: the weights this rank holds; two slots of one expert share them."""


def plan_experts(plan: Plan, rank: int) -> list[tuple[int, int]]:
    """The (layer, expert) pairs `plan` places on `rank`, each once, sorted."""
    return sorted({(layer, e) for layer, slots in enumerate(plan.slots) for e in slots[rank]})


class EPEngine:
    """The model as served by one rank under expert parallelism; callable as the model's MoEFn."""

    def __init__(
        self,
        source: WeightSource,
        plan: Plan,
        *,
        rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.arch, self.spec, self.shape = source.arch, source.spec, source.spec.shape
        self.rank, self.device = rank, torch.device(device)
        self.dtype = serving_dtype(source, dtype)
        self.model = build_model(source, self.device, self.dtype)
        loaded = load_experts(source, plan_experts(plan, rank), self.device, self.dtype)
        self.shard: Shard = [{} for _ in range(self.shape.layers)]
        for (layer, expert), weights in loaded.items():
            self.shard[layer][expert] = weights
        self.dispatcher = make_dispatcher(
            Placement.from_plan(plan, rank, self.shape.experts),
            self.shape.layers,
            self.shape.experts,
        )
        self.plan = plan
        self.gate_bias_LE = self._gate_bias(plan)
        # Wall time (CPU clock; on CUDA without syncs it is launch time) for the benchmark's FLOP/s.
        self.expert_seconds = self.moe_seconds = 0.0
        self.expert_tokens = 0

    @property
    def counts_LE(self) -> Tensor:
        """Tokens this rank's experts processed per (layer, logical expert); never reset."""
        return self.dispatcher.counts_LE

    def held_experts(self) -> list[set[int]]:
        """Per layer, the logical experts this rank holds under the plan being served."""
        return [set(experts) for experts in self.dispatcher.placement.local_experts]

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor:
        start = time.perf_counter()
        chunks, meta = self.dispatcher.dispatch(layer, x_ND, routing.topk_ids_NK)
        experts_start = time.perf_counter()
        slots = self.dispatcher.placement.local_experts[layer]
        outputs = [
            self.arch.expert_forward(x_ND_s, self.shard[layer][expert])
            for x_ND_s, expert in zip(chunks, slots, strict=True)
        ]
        self.expert_tokens += sum(x.shape[0] for x in chunks)
        self.expert_seconds += time.perf_counter() - experts_start
        y_ND = self.dispatcher.combine(outputs, meta, routing.topk_weights_NK)
        self.moe_seconds += time.perf_counter() - start
        return y_ND

    def reset_timers(self) -> None:
        self.expert_seconds = self.moe_seconds = 0.0
        self.expert_tokens = 0

    @torch.no_grad()
    def forward(
        self, batch: StepBatch, cache: KVCache, meta: StepMeta, *, all_positions: bool = False
    ) -> Tensor:
        """Collective: every rank calls it once per step with its own sequences (maybe none).

        `meta` is `cache.prepare(batch)`, done by the caller BEFORE this call, so a full cache
        fails on its own rank and never between two all-to-alls. Logits [B, V] (fp32) at each
        sequence's last new token ([N, V] if `all_positions`).
        """
        return self.model(
            batch, cache, self, self.gate_bias_LE, meta=meta, all_positions=all_positions
        )

    @torch.no_grad()
    def apply_plan(self, plan: Plan) -> int:
        """Collective: switch to `plan`; returns how many experts this rank received."""
        transfers = plan_transfers(self.plan, plan)
        received = self._exchange(transfers)
        shard: Shard = [{} for _ in range(self.shape.layers)]
        for layer, expert in plan_experts(plan, self.rank):
            held = self.shard[layer].get(expert)
            shard[layer][expert] = held if held is not None else received[(layer, expert)]
        self.shard = shard
        self.dispatcher.placement = Placement.from_plan(plan, self.rank, self.shape.experts)
        self.plan = plan
        self.gate_bias_LE = self._gate_bias(plan)
        return len(received)

    def _exchange(self, transfers: list[Transfer]) -> dict[tuple[int, int], ExpertWeights]:
        """Post every send and receive of the switch at once; sorted transfers keep the order of
        messages between two ranks the same on both sides."""
        shapes = self.arch.expert_shapes(self.shape)
        numel = sum(rows * cols for rows, cols in shapes)
        ops: list[dist.P2POp] = []
        buffers: dict[tuple[int, int], Tensor] = {}
        for t in transfers:
            if t.src == self.rank:
                flat = self.shard[t.layer][t.expert].flat()  # kept alive by the op until waited
                ops.append(dist.P2POp(dist.isend, flat, t.dst))
            if t.dst == self.rank:
                buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
                buffers[(t.layer, t.expert)] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, t.src))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return {key: ExpertWeights.from_flat(b, shapes) for key, b in buffers.items()}

    def _gate_bias(self, plan: Plan) -> Tensor | None:
        if plan.gate_bias is None:
            return None
        return torch.tensor(plan.gate_bias, dtype=torch.float32, device=self.device)
