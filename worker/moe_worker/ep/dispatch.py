"""Token dispatchers: send each token to the slots holding its experts, and bring the results back.

Strategy objects, not nn.Modules (torchtitan's token_dispatcher). Megatron-style, a dispatch is
local pre-processing and three communicating steps, so that another micro-batch can compute
while one is in flight (`moe_worker.ep.two_batch`):

    route          global slot of every assignment, sorted by slot (device, no host sync)
    send_counts    all-to-all of the counts per (rank, slot)                 -> Pending
    exchange_plan  the counts on the host: split sizes (THE host sync of a layer), metadata
    send_tokens    all-to-all of the tokens                                  -> Pending
    group_by_slot  received tokens grouped by local slot, for the grouped GEMM
    send_back      all-to-all of the expert outputs                          -> Pending
    combine_back   outputs back in assignment order, summed with the gate weights

Each collective is issued asynchronously (`async_op=True`; nccl runs it on its own stream) and
returned as a `Pending`; `dispatch()` and `combine()` chain the steps for synchronous callers.
`LocalDispatcher` (world 1) makes the collectives identities, so the same pre/post-processing
runs in one process for tests.

Collectives run on the dispatcher's `comm.Comm`: one membership epoch, whose members may be
fewer than the plan's ranks (a lost rank holds no slot in the plan the survivors serve, so no
token is sent to it: the counts and splits of the all-to-alls are those of the members, in
member order, which is plan-rank order).

Replicas: a logical expert held by several slots gets its tokens split among them by token index
(plus the rank, so ranks with few tokens do not all pick the first replica): deterministic, and
even in expectation. A plan with `ranksPerPod` routes by pod instead (`moe_contract.plan.
pod_routes`): each expert's tokens stay in this rank's pod up to the pod's share of its replicas
and the rest go to the pods that lack; a token's replica is drawn from those shares by a Weyl
sequence over its index (and the rank), so every replica still carries an even share of the
expert's tokens, and fewer of them cross the slower network between pods. Which replica
computes a token never changes its output.

Legend: N tokens, K top-k, A = N*K assignments, D hidden, E experts, L layers, R ranks,
S slots per rank, G = R*S global slots, M max replicas of one expert, n rows received.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_contract.plan import Plan, pod_routes
from moe_worker.ep.comm import Comm
from moe_worker.models.base import weighted_sum

ROUTE_BITS = 16
"""Shares of a pod's routes are kept in 1 / 2**16 units; a token draws a point of that range."""
_WEYL_TOKEN, _WEYL_RANK = 40503, 49471
"""2**16 / golden ratio and 2**16 / plastic number (odd): token t of rank r draws
(t * 40503 + r * 49471) mod 2**16, spread evenly over the range for any run of tokens."""


@dataclass(frozen=True)
class Placement:
    """A plan as one rank needs it for routing. Immutable; a plan switch builds a new one."""

    rank: int
    world_size: int
    slots_per_rank: int
    replica_slots_LEM: Tensor  # global slot ids of each expert's replicas, padded with -1
    replica_count_LE: Tensor
    local_experts: tuple[tuple[int, ...], ...]  # [L][S] logical expert of each local slot
    local_experts_LS: Tensor  # the same on the CPU, for counting
    route_slots_LEM: Tensor | None = None  # by pod: global slots this pod sends each expert to
    route_bounds_LEM: Tensor | None = None  # their cumulative shares, in 1 / 2**16, padded 2**16

    @classmethod
    def from_plan(
        cls, plan: Plan, rank: int, num_experts: int, device: torch.device | str = "cpu"
    ) -> Placement:
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
        routes = _pod_tables(plan, rank, num_experts)
        if routes is not None:
            routes = (routes[0].to(device), routes[1].to(device))
        return cls(
            rank,
            plan.world_size,
            s,
            table.to(device),
            count.to(device),
            local,
            torch.tensor(local),
            *(routes or (None, None)),
        )

    def slots_for(self, layer: int, topk_ids_NK: Tensor) -> Tensor:
        """Global slot of every assignment [A]: its expert's replica chosen by token index.
        Stays on the ids' device (the tables live there): no host synchronisation."""
        n, k = topk_ids_NK.shape
        ids_A = topk_ids_NK.reshape(-1)
        if self.route_bounds_LEM is not None and self.route_slots_LEM is not None:
            token_A = torch.arange(n, device=ids_A.device).repeat_interleave(k)
            point_A = (token_A * _WEYL_TOKEN + self.rank * _WEYL_RANK) % (1 << ROUTE_BITS)
            bounds_AM = self.route_bounds_LEM[layer].index_select(0, ids_A)
            pick_A = (point_A[:, None] >= bounds_AM).sum(dim=1)
            return self.route_slots_LEM[layer][ids_A, pick_A]
        if self.replica_slots_LEM.shape[2] == 1:  # no replicas: one lookup
            return self.replica_slots_LEM[layer, :, 0].index_select(0, ids_A)
        token_A = torch.arange(n, device=ids_A.device).repeat_interleave(k)
        pick_A = (token_A + self.rank) % self.replica_count_LE[layer][ids_A]
        return self.replica_slots_LEM[layer][ids_A, pick_A]


def _pod_tables(plan: Plan, rank: int, num_experts: int) -> tuple[Tensor, Tensor] | None:
    """(route_slots_LEM, route_bounds_LEM) of this rank's pod, or None for a plan without pods
    (or of a single pod): the slot of a token's share is the first whose bound exceeds its draw."""
    per_pod = plan.ranks_per_pod
    if per_pod is None or per_pod >= plan.world_size:
        return None
    routes = [pod_routes(layer, per_pod, rank // per_pod) for layer in plan.slots]
    width = max(len(shares) for layer in routes for shares in layer.values())
    full = 1 << ROUTE_BITS
    slots = torch.zeros(plan.num_layers, num_experts, width, dtype=torch.int64)
    bounds = torch.full((plan.num_layers, num_experts, width), full, dtype=torch.int64)
    for layer, by_expert in enumerate(routes):
        for expert, shares in by_expert.items():
            total = 0.0
            for index, (slot, share) in enumerate(shares):
                total += share
                slots[layer, expert, index] = slot
                bounds[layer, expert, index] = round(total * full)
            bounds[layer, expert, len(shares) - 1] = full  # the last share takes the rest
    return slots, bounds


class Pending:
    """A collective in flight (or, at world 1, already done).

    `wait()` returns its output for use on the device (gloo: blocks until it arrived; nccl: the
    current stream waits, the host does not). `to_host()` brings it to the CPU, blocking the host
    only for this collective: on CUDA the copy runs on a side stream that waits for the
    collective alone, not for the other micro-batch's kernels queued on the compute stream.
    Time blocked is added to the dispatcher's `comm_seconds` (exposed communication).
    """

    def __init__(self, output: Tensor, work: dist.Work | None, owner: Dispatcher) -> None:
        self.output, self._work, self._owner = output, work, owner

    def wait(self) -> Tensor:
        if self._work is not None:
            start = time.perf_counter()
            self._owner.comm.wait(self._work)
            self._owner.comm_seconds += time.perf_counter() - start
            self._work = None
        return self.output

    def to_host(self, *before: Tensor) -> Tensor:
        """[1 + len(before), ...] on the CPU: `before` (same shape, ready on the device before
        the collective was issued) stacked with the output."""
        if self.output.device.type != "cuda":
            return torch.stack([*before, self.wait()]).cpu()  # wait() counts its own time
        start = time.perf_counter()
        side, compute = _side_stream(self.output.device), torch.cuda.current_stream()
        with torch.cuda.stream(side):
            if self._work is not None:
                self._owner.comm.wait(self._work)  # the side stream waits for it only
            else:
                side.wait_stream(compute)  # world 1: the counts come from the compute stream
            host = torch.stack([*before, self.output]).to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        copied.synchronize()
        self._owner.comm_seconds += time.perf_counter() - start
        self.wait()  # and the compute stream too (nccl: no host wait), for later use
        return host


@dataclass(frozen=True)
class Routed:
    """One layer call after local routing, before any communication."""

    layer: int
    num_tokens: int
    top_k: int
    unorder_A: Tensor  # its inverse: where each assignment (token-major) sits in slot order
    x_AD: Tensor  # one row per assignment, in slot order
    send_counts_RS: Tensor  # assignments for each (rank, slot), on the collective device


@dataclass(frozen=True)
class DispatchMeta:
    """What the remaining steps need once the counts are known; combine() consumes it."""

    num_tokens: int
    top_k: int
    unorder_A: Tensor
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_order: Tensor  # permutation grouping received rows by local slot
    recv_unorder: Tensor  # its inverse
    slot_sizes: tuple[int, ...]  # rows for each local slot
    slot_counts_S: Tensor  # the same on the tokens' device (grouped GEMM offsets)


class Dispatcher:
    """All-to-all expert-parallel dispatch over `comm` (None: the default process group)."""

    def __init__(
        self, placement: Placement, num_layers: int, num_experts: int, comm: Comm | None = None
    ) -> None:
        self.placement = placement
        self._comm = comm
        # Tokens this rank processed per (layer, logical expert); read by /metrics, never reset.
        self.counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.comm_seconds = 0.0
        self._member_rows: tuple[tuple[int, ...], Tensor] | None = None

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = Comm.world()
        return self._comm

    @comm.setter
    def comm(self, comm: Comm) -> None:
        self._comm = comm

    @property
    def epoch_comm(self) -> Comm | None:
        """The membership epoch set, if any (None: the default group, resolved when used)."""
        return self._comm

    def _members_only(self, counts_RS: Tensor) -> Tensor:
        """The rows of the epoch's members (all of them, unless ranks are lost)."""
        members = self.comm.members
        if len(members) == counts_RS.shape[0]:
            return counts_RS
        if self._member_rows is None or self._member_rows[0] != members:
            index = torch.tensor(members, dtype=torch.int64, device=counts_RS.device)
            self._member_rows = (members, index)
        return counts_RS.index_select(0, self._member_rows[1])

    # ------------------------------------------------------------ the steps

    def route(self, layer: int, x_ND: Tensor, topk_ids_NK: Tensor) -> Routed:
        p = self.placement
        n, k = topk_ids_NK.shape
        slot_A = p.slots_for(layer, topk_ids_NK)
        order_A = torch.argsort(slot_A, stable=True)
        # Gathers only (index_select), never scatters: several times faster on the CPU.
        x_AD = x_ND.index_select(0, order_A // k)
        # scatter_add, not bincount: bincount on CUDA reads the maximum back to the host.
        counts_G = torch.zeros(
            p.world_size * p.slots_per_rank, dtype=torch.int64, device=x_ND.device
        )
        counts_G.scatter_add_(0, slot_A, torch.ones_like(slot_A))
        send_counts_RS = self._members_only(counts_G.view(p.world_size, p.slots_per_rank))
        counts = send_counts_RS.to(self._counts_device(x_ND))
        return Routed(layer, n, k, _inverse(order_A), x_AD, counts)

    def send_counts(self, routed: Routed) -> Pending:
        recv_RS = torch.empty_like(routed.send_counts_RS)
        return self._all_to_all(recv_RS, routed.send_counts_RS, None, None)

    def exchange_plan(self, routed: Routed, counts: Pending) -> DispatchMeta:
        """Split sizes on the host (one device-to-host copy of both count tables), the order
        grouping received rows by slot, and the (layer, expert) token counts."""
        p, device = self.placement, routed.x_AD.device
        both_2RS = counts.to_host(routed.send_counts_RS)
        recv_counts_RS = counts.wait()
        send_splits = both_2RS[0].sum(1).tolist()
        recv_splits = both_2RS[1].sum(1).tolist()
        slot_sizes_S = both_2RS[1].sum(0)
        if p.local_experts[routed.layer]:  # a rank out of the plan (joining) holds no slot
            local_LS = p.local_experts_LS[routed.layer]
            self.counts_LE[routed.layer].index_add_(0, local_LS, slot_sizes_S)
        recv_counts_RS = recv_counts_RS.to(device)
        received = sum(recv_splits)
        slot_of_recv = (
            torch.arange(p.slots_per_rank, device=device)
            .repeat(recv_counts_RS.shape[0])
            .repeat_interleave(recv_counts_RS.reshape(-1), output_size=received)
        )
        recv_order = torch.argsort(slot_of_recv, stable=True)
        return DispatchMeta(
            num_tokens=routed.num_tokens,
            top_k=routed.top_k,
            unorder_A=routed.unorder_A,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_order=recv_order,
            recv_unorder=_inverse(recv_order),
            slot_sizes=tuple(slot_sizes_S.tolist()),
            slot_counts_S=recv_counts_RS.sum(0),
        )

    def send_tokens(self, routed: Routed, meta: DispatchMeta) -> Pending:
        return self._exchange(routed.x_AD, meta.send_splits, meta.recv_splits)

    @staticmethod
    def group_by_slot(recv_nD: Tensor, meta: DispatchMeta) -> Tensor:
        """Received rows [n, D], grouped by local slot (slot 0's rows first)."""
        return recv_nD.index_select(0, meta.recv_order)

    def send_back(self, y_nD: Tensor, meta: DispatchMeta) -> Pending:
        """Expert outputs grouped by slot [n, D] back to the ranks they came from."""
        recv_nD = y_nD.index_select(0, meta.recv_unorder)
        return self._exchange(recv_nD, meta.recv_splits, meta.send_splits)

    @staticmethod
    def combine_back(sent_AD: Tensor, meta: DispatchMeta, topk_weights_NK: Tensor) -> Tensor:
        """[N, D]: every assignment's output in token order, weighted by the unbiased gate."""
        y_AD = sent_AD.index_select(0, meta.unorder_A)
        y_NKD = y_AD.view(meta.num_tokens, meta.top_k, y_AD.shape[-1])  # N may be 0
        return weighted_sum(y_NKD, topk_weights_NK)

    # ------------------------------------------------------------ synchronous use

    def dispatch(
        self, layer: int, x_ND: Tensor, topk_ids_NK: Tensor
    ) -> tuple[Tensor, DispatchMeta]:
        """Rows for the local slots, grouped by slot [n, D], and the metadata to send them back."""
        routed = self.route(layer, x_ND, topk_ids_NK)
        meta = self.exchange_plan(routed, self.send_counts(routed))
        return self.group_by_slot(self.send_tokens(routed, meta).wait(), meta), meta

    def combine(self, y_nD: Tensor, meta: DispatchMeta, topk_weights_NK: Tensor) -> Tensor:
        """Outputs grouped by slot [n, D] -> [N, D] weighted by the (unbiased) gate weights."""
        return self.combine_back(self.send_back(y_nD, meta).wait(), meta, topk_weights_NK)

    # ------------------------------------------------------------ the collectives

    def _exchange(self, x_AD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        recv = x_AD.new_empty(sum(recv_splits), x_AD.shape[1])
        return self._all_to_all(recv, x_AD.contiguous(), recv_splits, send_splits)

    def _all_to_all(
        self, out: Tensor, inp: Tensor, out_splits: list[int] | None, in_splits: list[int] | None
    ) -> Pending:
        work = self.comm.all_to_all_single(out, inp, out_splits, in_splits)
        return Pending(out, work, self)

    def _counts_device(self, x_ND: Tensor) -> torch.device:
        """nccl moves only CUDA tensors, gloo only CPU ones."""
        return self.comm.device


class LocalDispatcher(Dispatcher):
    """World size 1: the same grouping by slot, no communication."""

    def _all_to_all(
        self, out: Tensor, inp: Tensor, out_splits: list[int] | None, in_splits: list[int] | None
    ) -> Pending:
        return Pending(inp, None, self)

    def _counts_device(self, x_ND: Tensor) -> torch.device:
        return x_ND.device  # no collective: the counts stay where the tokens are

    def _members_only(self, counts_RS: Tensor) -> Tensor:
        return counts_RS


def _inverse(order: Tensor) -> Tensor:
    """The inverse permutation of `order` (scatter_: a third cheaper on the CPU than index_put)."""
    positions = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, positions)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for reading counts back while the compute stream works."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def make_dispatcher(
    placement: Placement, num_layers: int, num_experts: int, comm: Comm | None = None
) -> Dispatcher:
    cls = LocalDispatcher if placement.world_size == 1 else Dispatcher
    return cls(placement, num_layers, num_experts, comm)
