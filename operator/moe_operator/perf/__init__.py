"""Performance model: predicted throughput of a layout, and the gain of a rebalance. PURE (stdlib).

The public face of the model. Per-layer terms live in `model`, the dataclasses in `types`, printing
in `report`, calibration from measurements in `calibrate`; `profiles` reads profile files (the
package's only I/O, at its edge).
Method and numbers: docs/performance.md.

    predict(shape, workload, layout, profile, imbalance=1.0, overlap=0.0, cross_node=None)
        -> Prediction
    predicted_gain(shape, layout, profile, imbalance_before, imbalance_after, slots_moved,
                   bytes_per_slot, cross_before=None, cross_after=None)
        -> (throughput_gain_ratio, estimated_move_seconds)

`cross_node`: the share of EP all-to-all bytes that cross nodes, as a plan routed by pod predicts
(`moe-ep plan --ranks-per-pod`; pods are nodes); None: tokens spread uniformly over the EP ranks.
"""

from __future__ import annotations

import math
import re

from moe_operator.perf.model import (
    cross_node_fraction,
    dense_layer_seconds,
    dense_layers_per_stage,
    flops_per_token,
    layer_terms,
    memory_per_gpu,
    pp_p2p_seconds,
)
from moe_operator.perf.types import (
    HardwareProfile,
    Layout,
    Memory,
    ModelShape,
    NetworkProfile,
    Phase,
    Prediction,
    Profile,
    Terms,
    Workload,
)

__all__ = [
    "HardwareProfile",
    "Layout",
    "Memory",
    "ModelShape",
    "NetworkProfile",
    "Phase",
    "Prediction",
    "Profile",
    "Terms",
    "Workload",
    "check_layout",
    "parse_layout",
    "predict",
    "predicted_gain",
]


def parse_layout(text: str) -> Layout:
    """'ep16', 'tp8pp2', 'ep4tp2', 'ep8s3' (3 slots per rank), 'tp8pp2m8' (8 micro-batches)."""
    text = text.strip().lower()
    parts = re.findall(r"(ep|tp|pp|s|m)(\d+)", text)
    if not parts or "".join(k + v for k, v in parts) != text:
        raise ValueError(f"layout {text!r}: expected e.g. 'ep16', 'tp8pp2', 'ep4tp2s2m4'")
    vals = {k: int(v) for k, v in parts}
    return Layout(
        ep=vals.get("ep", 1),
        tp=vals.get("tp", 1),
        pp=vals.get("pp", 1),
        slots_per_rank=vals.get("s"),
        micro_batches=vals.get("m"),
    )


def check_layout(shape: ModelShape, layout: Layout) -> None:
    """Raise ValueError when the layout cannot hold the model."""
    if min(layout.ep, layout.tp, layout.pp) < 1:
        raise ValueError(f"{layout.name}: ep, tp and pp must be >= 1")
    if layout.slots(shape) * layout.ep < shape.experts:
        raise ValueError(
            f"{layout.name}: {layout.slots(shape)} slots x ep {layout.ep} < {shape.experts} experts"
        )
    if layout.pp > shape.layers:
        raise ValueError(f"{layout.name}: pp {layout.pp} > {shape.layers} layers")


def _labelled(terms: Terms) -> list[tuple[str, float]]:
    return [
        (
            "attention projections (HBM weights)"
            if terms.proj_weight_bound
            else "attention projections (FLOPs)",
            terms.projections,
        ),
        ("KV cache reads (HBM)" if terms.kv_bound else "attention scores (FLOPs)", terms.scores),
        (
            "expert weight reads (HBM)" if terms.expert_weight_bound else "expert GEMMs (FLOPs)",
            terms.experts,
        ),
    ]


def predict(
    shape: ModelShape,
    workload: Workload,
    layout: Layout,
    profile: Profile,
    imbalance: float = 1.0,
    overlap: float = 0.0,
    cross_node: float | None = None,
) -> Prediction:
    """Predict one layout.

    imbalance: max rank load / mean rank load of the experts (>= 1; applies across EP ranks).
    overlap: fraction in [0, 1] of min(compute, communication) hidden per layer.
    cross_node: share of EP all-to-all bytes crossing nodes (None: uniform routing).
    Prefill: `seconds` is the whole batch pass; decode: one step (every sequence gains a token).
    """
    check_layout(shape, layout)
    if imbalance < 1.0:
        raise ValueError(f"imbalance {imbalance} < 1 (it is max load / mean load)")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap {overlap} not in [0, 1]")
    phase = workload.phase
    m = layout.micro(phase)
    terms = layer_terms(shape, workload, layout, profile, imbalance, cross_node)
    hidden = overlap * min(terms.compute, terms.comm)
    layer = terms.compute + terms.comm - hidden
    lps = math.ceil(shape.layers / layout.pp)
    p2p = pp_p2p_seconds(shape, workload, layout, profile)
    dense = dense_layers_per_stage(shape, layout)
    dense_layer = dense_layer_seconds(shape, workload, layout, profile, terms) if dense else 0.0
    stage = lps * layer + dense * dense_layer + p2p
    slots_in_pass = m + layout.pp - 1 if phase == "prefill" else max(m, layout.pp)
    seconds = slots_in_pass * stage
    if phase == "prefill":
        tokens_per_s = workload.batch * workload.seq_len / seconds
        tpot = None
    else:
        tokens_per_s = workload.batch / seconds
        tpot = seconds

    busy = m * lps  # layer passes of one micro-batch on one stage, per pass of the batch
    exposed = terms.comm - hidden
    share = exposed / terms.comm if terms.comm else 0.0
    breakdown = [(label, busy * t) for label, t in _labelled(terms)]
    breakdown += [
        ("dense layers (attention + MLP)", m * dense * dense_layer),
        ("EP all-to-all", busy * terms.ep_alltoall * share),
        ("TP all-reduce", busy * terms.tp_allreduce * share),
        ("PP point-to-point", m * p2p),
        ("PP bubble", (slots_in_pass - m) * stage),
    ]
    breakdown = [(k, v) for k, v in breakdown if v > 0]
    bound = max(breakdown, key=lambda kv: kv[1])[0]

    fpt = flops_per_token(shape, workload)
    frac = fpt * tokens_per_s / (layout.world * profile.hardware.peak_flops)
    return Prediction(
        layout=layout,
        phase=phase,
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        tpot_s=tpot,
        flops_per_token=fpt,
        flop_fraction=frac,
        bound=bound,
        breakdown=tuple(breakdown),
        terms=terms,
        memory=memory_per_gpu(shape, workload, layout, profile, imbalance),
        micro_batches=m,
        cross_node=cross_node_fraction(layout, profile.network, cross_node)
        if layout.ep > 1
        else 0.0,
    )


def move_seconds(
    layout: Layout, profile: Profile, slots_moved: int, bytes_per_slot: float
) -> float:
    """Upper bound on the time to move expert weights: all slots serially over the slowest link the
    layout spans (InfiniBand when it spans nodes, NVLink otherwise), at collective efficiency."""
    if slots_moved <= 0:
        return 0.0
    net, eff = profile.network, profile.hardware.collective_efficiency
    spans_nodes = layout.world > net.gpus_per_node
    bw = net.inter_bandwidth if spans_nodes else net.intra_bandwidth
    lat = net.inter_latency if spans_nodes else net.intra_latency
    return slots_moved * (bytes_per_slot / (bw * eff) + lat)


def predicted_gain(
    shape: ModelShape,
    layout: Layout,
    profile: Profile,
    imbalance_before: float,
    imbalance_after: float,
    slots_moved: int,
    bytes_per_slot: float,
    workload: Workload | None = None,
    overlap: float = 0.0,
    cross_before: float | None = None,
    cross_after: float | None = None,
) -> tuple[float, float]:
    """(throughput after / throughput before, estimated seconds to move the slots) for a rebalance.

    workload defaults to the seed's prefill batch (128 x 10,000 tokens). Imbalances are max / mean
    rank load (>= 1); bytes_per_slot is one expert slot's weights (bytes); cross_before/after:
    the plans' predicted cross-pod fractions (None: uniform routing).
    """
    wl = workload or Workload()
    before = predict(shape, wl, layout, profile, max(1.0, imbalance_before), overlap, cross_before)
    after = predict(shape, wl, layout, profile, max(1.0, imbalance_after), overlap, cross_after)
    return after.tokens_per_s / before.tokens_per_s, move_seconds(
        layout, profile, slots_moved, bytes_per_slot
    )
