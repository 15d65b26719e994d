"""One rank's expert-parallel engine: the replicated dense model, this rank's experts as stacked
slot tensors, and the all-to-all dispatcher as the model's MoEFn.

The experts are only those the plan's slots give this rank, read from the weight source
(synthetic, or a checkpoint tensor by tensor), stacked per layer and matrix (`slots.SlotStacks`)
and run by one grouped GEMM per matrix (`models.grouped`). A plan switch never re-reads them:
the switch room (`moe_worker.switch`) brings every expert a rank lacks from a holder, and
`install` makes the engine serve the new plan with them.

An MoE layer is a generator (`moe_steps`) that yields right after issuing each big all-to-all,
so `two_batch` can run another micro-batch meanwhile; `__call__` runs it straight through.

Every method that communicates is collective: all ranks call it at the same step, in the same order
(the runtime's step descriptor guarantees that). No HTTP or metrics code here.

Legend: N tokens, n rows received for the local slots, B sequences, V vocabulary, D hidden,
L layers, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence

import torch
from torch import Tensor

from moe_contract.plan import Plan
from moe_worker.ep.comm import Comm
from moe_worker.ep.dispatch import DispatchMeta, Pending, Placement, make_dispatcher
from moe_worker.ep.slots import Matrices, SlotStacks
from moe_worker.ep.two_batch import forward_steps, interleave, run_through
from moe_worker.models import GateBias, PriceCounters, Routing
from moe_worker.models.grouped import SlotGroups, choose_kernel
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models.weights import WeightSource, build_model, load_experts, serving_dtype

MoESteps = Generator[Pending, None, Tensor]


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
        kernel: str = "auto",
        comm: Comm | None = None,
        record: Plan | None = None,
    ) -> None:
        self.source = source
        self.arch, self.spec, self.shape = source.arch, source.spec, source.spec.shape
        self.rank, self.device = rank, torch.device(device)
        self.dtype = serving_dtype(source, dtype)
        self.kernel = choose_kernel(self.device, self.dtype, kernel)
        self.model = build_model(source, self.device, self.dtype)
        if rank in plan.absent:  # joining a running group: its experts come from the holders
            shapes = self.arch.expert_shapes(self.shape)
            self.stacks = SlotStacks.empty(self.shape.layers, shapes, self.dtype, self.device)
        else:
            loaded = load_experts(source, plan_experts(plan, rank), self.device, self.dtype)
            self.stacks = SlotStacks.build([slots[rank] for slots in plan.slots], loaded)
            del loaded
        self.dispatcher = make_dispatcher(
            self._placement(plan), self.shape.layers, self.shape.experts, comm
        )
        self.plan = plan
        """The layout served: the operator's plan, or one degraded from it (`absentRanks`)."""
        self.record = record or plan
        """The operator's plan it comes from (what GET /v1/plan answers)."""
        self.price = PriceCounters(self.shape.layers, self.device)
        self.gate = self._gate(plan)
        self.reset_timers()

    @property
    def counts_LE(self) -> Tensor:
        """Tokens this rank's experts processed per (layer, logical expert); never reset."""
        return self.dispatcher.counts_LE

    @property
    def comm_seconds(self) -> float:
        """Time blocked on the MoE all-to-alls (exposed communication)."""
        return self.dispatcher.comm_seconds

    def reroutes(self) -> tuple[list[int], list[float]]:
        """Per layer [L]: top-K assignments of this rank's tokens that the gate bias moved off
        the model's own choice, and the gate probability they lost; never reset."""
        return self.price.read()

    @property
    def comm(self) -> Comm:
        """The process group (membership epoch) of the MoE all-to-alls."""
        return self.dispatcher.comm

    def join_epoch(self, comm: Comm) -> None:
        """Run the MoE all-to-alls on `comm` from now on (a new membership epoch)."""
        self.dispatcher.comm = comm

    def read_expert(self, layer: int, expert: int) -> Matrices:
        """One expert's matrices read from the weights (the checkpoint, or the synthetic seed):
        for an expert no live rank holds any more."""
        weights = load_experts(self.source, [(layer, expert)], self.device, self.dtype)
        return tuple(weights[(layer, expert)].matrices)

    def held_experts(self) -> list[set[int]]:
        """Per layer, the logical experts this rank holds under the plan being served."""
        return self.stacks.held()

    # ------------------------------------------------------------ the MoE layer

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor:
        return run_through(self.moe_steps(layer, x_ND, routing))

    def moe_steps(self, layer: int, x_ND: Tensor, routing: Routing) -> MoESteps:
        """One MoE layer; yields right after issuing each of its two big all-to-alls (tokens
        out, outputs back) and waits for it when resumed."""
        return self._timed(self._moe_steps(layer, x_ND, routing))

    def _moe_steps(self, layer: int, x_ND: Tensor, routing: Routing) -> MoESteps:
        d = self.dispatcher
        routed = d.route(layer, x_ND, routing.topk_ids_NK)
        # The counts are a few bytes and their sizes are needed at once (the layer's one host
        # synchronisation): waited for here, so that the two big transfers are what a second
        # micro-batch overlaps (yielding here too would leave the tokens' transfer exposed).
        meta = d.exchange_plan(routed, d.send_counts(routed))
        tokens = d.send_tokens(routed, meta)
        yield tokens
        y_nD = self._experts(layer, d.group_by_slot(tokens.wait(), meta), meta)
        back = d.send_back(y_nD, meta)
        yield back
        return d.combine_back(back.wait(), meta, routing.topk_weights_NK)

    def _experts(self, layer: int, x_nD: Tensor, meta: DispatchMeta) -> Tensor:
        if not self.stacks.experts(layer):  # out of the plan (joining): no slot, no rows
            return x_nD
        start, cpu = time.perf_counter(), time.thread_time()
        groups = SlotGroups.of(meta.slot_sizes, self.kernel, meta.slot_counts_S)
        y_nD = self.arch.grouped_forward(x_nD, self.stacks.layer(layer), groups)
        self.expert_tokens += groups.rows
        self.expert_seconds += time.perf_counter() - start
        self.expert_cpu_seconds += time.thread_time() - cpu
        return y_nD

    def _timed(self, steps: MoESteps) -> MoESteps:
        """`steps`, its own running time (waits included, the other micro-batch's work not)
        added to `moe_seconds`, and this thread's CPU time to `moe_cpu_seconds`."""
        while True:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                pending = next(steps)
            except StopIteration as done:
                self._add_moe_time(start, cpu)
                return done.value  # type: ignore[no-any-return]
            self._add_moe_time(start, cpu)
            yield pending

    def _add_moe_time(self, start: float, cpu: float) -> None:
        self.moe_seconds += time.perf_counter() - start
        self.moe_cpu_seconds += time.thread_time() - cpu

    def reset_timers(self) -> None:
        """The benchmark's clocks. Wall time (on CUDA without syncs: launch time), and the
        serving thread's CPU time: what the token path itself costs, however many other
        processes share its core."""
        self.expert_seconds = self.moe_seconds = self.dispatcher.comm_seconds = 0.0
        self.expert_cpu_seconds = self.moe_cpu_seconds = 0.0
        self.expert_tokens = 0

    # ------------------------------------------------------------ a step

    @torch.no_grad()
    def forward(
        self, batch: StepBatch, cache: KVCache, meta: StepMeta, *, all_positions: bool = False
    ) -> Tensor:
        """Collective: every rank calls it once per step with its own sequences (maybe none).

        `meta` is `cache.prepare(batch)`, done by the caller BEFORE this call, so a full cache
        fails on its own rank and never between two all-to-alls. Logits [B, V] (fp32) at each
        sequence's last new token ([N, V] if `all_positions`).
        """
        return self.model(batch, cache, self, self.gate, meta=meta, all_positions=all_positions)

    @torch.no_grad()
    def forward_overlapped(
        self,
        batches: Sequence[StepBatch],
        cache: KVCache,
        metas: Sequence[StepMeta],
        *,
        all_positions: bool = False,
    ) -> list[Tensor]:
        """Collective: the step's micro-batches (two-batch overlap), each prepared in order
        before the call; the logits of each. Every rank passes the same number of them."""
        steps = [
            forward_steps(self.model, self.moe_steps, b, cache, m, self.gate, all_positions)
            for b, m in zip(batches, metas, strict=True)
        ]
        return interleave(steps)

    # ------------------------------------------------------------ serving another plan

    @property
    def expert_bytes(self) -> int:
        """Memory of one expert slot (all of its matrices) in the serving dtype."""
        rows_cols = self.arch.expert_shapes(self.shape)
        return sum(r * c for r, c in rows_cols) * torch.empty((), dtype=self.dtype).element_size()

    @torch.no_grad()
    def install(
        self,
        plan: Plan,
        received: Mapping[tuple[int, int], Matrices],
        record: Plan | None = None,
    ) -> None:
        """Serve `plan` (the layout of the operator's `record`; by default itself) from now on:
        each slot it changes is copied from `received` (the experts that came from other ranks
        or from the weights, by (layer, expert)) or from the slot that held it here."""
        self.stacks.flip([slots[self.rank] for slots in plan.slots], received)
        self.dispatcher.placement = self._placement(plan)
        self.plan = plan
        self.record = record or plan
        self.gate = self._gate(plan)

    def _placement(self, plan: Plan) -> Placement:
        return Placement.from_plan(plan, self.rank, self.shape.experts, self.device)

    def _gate(self, plan: Plan) -> GateBias | None:
        """The plan's bias and guard, its price counted into `price` (the same counters across
        plans: they never reset)."""
        if plan.gate_bias is None:
            return None
        bias_LE = torch.tensor(plan.gate_bias, dtype=torch.float32, device=self.device)
        return GateBias(bias_LE, plan.gate_max_margin, self.price)
