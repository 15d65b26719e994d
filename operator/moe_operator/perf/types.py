"""Frozen inputs and outputs of the performance model (see model.py for the method). PURE.

The model shape is the deployment's own `moe_contract.shape.ModelShape`.

Units: seconds, bytes, FLOPs, FLOP/s, bytes/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from moe_contract.shape import ModelShape

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class Workload:
    """A batch. Prefill: all batch x seq_len tokens in one pass. Decode: one new token per sequence,
    attending to a KV cache of seq_len tokens."""

    batch: int = 128
    seq_len: int = 10_000
    phase: Phase = "prefill"


@dataclass(frozen=True)
class Layout:
    """A parallel layout; world size = ep x tp x pp.

    slots_per_rank: expert slots per rank and layer (None: experts / ep, the seed's placement).
    micro_batches: pipeline micro-batches (None: 4 x pp for prefill, pp for decode; 1 without PP).
    """

    ep: int = 1
    tp: int = 1
    pp: int = 1
    slots_per_rank: int | None = None
    micro_batches: int | None = None

    @property
    def world(self) -> int:
        return self.ep * self.tp * self.pp

    def slots(self, shape: ModelShape) -> int:
        """Expert slots per rank and layer actually held."""
        return self.slots_per_rank or math.ceil(shape.experts / self.ep)

    def micro(self, phase: Phase) -> int:
        """Number of pipeline micro-batches used for `phase`."""
        if self.micro_batches:
            return self.micro_batches
        if self.pp == 1:
            return 1
        return 4 * self.pp if phase == "prefill" else self.pp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("ep", self.ep), ("tp", self.tp), ("pp", self.pp)) if v > 1]
        return "".join(parts) or "ep1"


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU (or CPU). Efficiencies are achieved fractions of the peak figure, in (0, 1]."""

    name: str
    peak_flops: float  # FLOP/s, dense bf16 (no sparsity)
    memory_bandwidth: float  # bytes/s
    memory_capacity: float  # bytes
    matmul_efficiency: float = 0.7  # dense GEMMs (projections)
    expert_efficiency: float = 0.6  # expert (grouped) GEMMs
    attention_efficiency: float = 0.5  # causal score terms (flash-attention style)
    memory_efficiency: float = 0.85  # achieved fraction of HBM bandwidth
    collective_efficiency: float = 0.8  # achieved fraction of link bandwidth by collectives
    overlap_efficiency: float = 0.0  # fraction of min(compute, comm) two micro-batches hide
    runtime_overhead_bytes: float = 2e9  # CUDA context, allocator slack, communicator buffers


@dataclass(frozen=True)
class NetworkProfile:
    """Links, bandwidth per GPU per direction (bytes/s), latency per message (s)."""

    gpus_per_node: int = 8
    intra_bandwidth: float = 450e9  # NVLink
    intra_latency: float = 5e-6
    inter_bandwidth: float = 50e9  # InfiniBand
    inter_latency: float = 10e-6


@dataclass(frozen=True)
class Profile:
    """A hardware and a network profile with the source of every figure (field -> text)."""

    name: str
    hardware: HardwareProfile
    network: NetworkProfile
    sources: tuple[tuple[str, str], ...] = ()

    def source(self, field: str) -> str:
        return dict(self.sources).get(field, "unspecified")


@dataclass(frozen=True)
class Terms:
    """Per-layer times on the slowest rank for one micro-batch (seconds), and their memory/compute
    sides so the bounding term can be named."""

    projections: float
    scores: float
    experts: float
    ep_alltoall: float
    tp_allreduce: float
    kv_bound: bool  # scores limited by KV reads rather than FLOPs
    expert_weight_bound: bool  # experts limited by weight reads rather than FLOPs
    proj_weight_bound: bool

    @property
    def compute(self) -> float:
        return self.projections + self.scores + self.experts

    @property
    def comm(self) -> float:
        return self.ep_alltoall + self.tp_allreduce


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: float
    kv_cache: float
    activations: float
    buffers: float
    capacity: float
    per_slot: float = 0.0
    """What one more expert slot per rank adds: one expert of every layer this GPU holds (the
    price of placement.maxSlotsPerRank - slotsPerRank in memory)."""
    slots: int = 0
    """Expert slots per rank and layer held (counted in `weights`)."""

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.buffers

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def spare_slots(self) -> int:
        """More expert slots per rank that would still fit (0 when none, or nothing fits)."""
        if self.per_slot <= 0 or not self.fits:
            return 0
        return int((self.capacity - self.total) // self.per_slot)


@dataclass(frozen=True)
class Prediction:
    """Result for one layout. `breakdown` maps term -> seconds of the whole pass it accounts for."""

    layout: Layout
    phase: Phase
    seconds: float  # prefill: the whole batch; decode: one step (all sequences advance one token)
    tokens_per_s: float
    tpot_s: float | None  # decode only
    flops_per_token: float
    flop_fraction: float  # achieved model FLOP/s over world x peak
    bound: str
    breakdown: tuple[tuple[str, float], ...]
    terms: Terms
    memory: Memory
    micro_batches: int
    cross_node: float = 0.0
    """Share of this layout's EP all-to-all bytes modelled as crossing nodes."""
