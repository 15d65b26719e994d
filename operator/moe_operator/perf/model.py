"""Analytical performance model of an MoE transformer under EP x TP x PP layouts. PURE (stdlib).

Units everywhere: seconds, bytes, FLOPs, FLOP/s, bytes/s. Times are per GPU on the slowest rank.

Method (docs/performance.md has the long form and the numbers):
- Every operation is a roofline:
  max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x memory efficiency)).
- A layer's compute = attention projections (+ gate, + shared experts) + causal score terms
  (QK^T, PV) + experts. Experts on the slowest EP rank scale by the imbalance ratio (max rank
  load / mean rank load). Dense first layers (GLM-4.5, DeepSeek-V3) are attention + one dense
  MLP on every rank, no all-to-all. Multi-head latent attention (DeepSeek-V3) caches a latent
  and a rotary key per token; prefill expands the latents into keys and values, decode attends
  in latent space (`moe_worker.models.mla`).
- Communication: EP all-to-all (dispatch + combine, split into same GPU / NVLink / InfiniBand by
  where the peers sit), TP ring all-reduce (2 per layer, 2(n-1)/n of the message), PP
  point-to-point.
- Overlap: `overlap` in [0, 1] is the fraction of min(compute, communication) hidden per layer:
  0 = none (layer = compute + comm, the default), 1 = perfect (layer = max(compute, comm)).
- PP: prefill takes (m + pp - 1) micro-batch stage times (bubble (pp-1)/(m+pp-1)); decode is a
  steady pipeline with period max(m, pp) stage times (TPOT = period).
- Rank order: rank = stage x (ep x tp) + ep_index x tp + tp_index; node = rank // gpus_per_node.
- Attention is data-parallel over the EP groups (each holds batch/ep sequences) and
  head-parallel over TP; experts are split over EP groups (slots) and each expert's FFN over TP.
"""

from __future__ import annotations

import math

from moe_operator.perf.types import (
    Layout,
    Memory,
    ModelShape,
    NetworkProfile,
    Phase,
    Profile,
    Terms,
    Workload,
)

# --- FLOPs and bytes (hand-checkable) ----------------------------------------------------------


def attention_projection_flops(shape: ModelShape, tokens: float) -> float:
    """QKV + O projections: tokens x 8 x hidden x attn_dim (MLA: 2 x its projection weights)."""
    if shape.latent_attention:
        return tokens * 2 * shape.attn_params
    return tokens * 8 * shape.hidden * shape.attn_dim


def projection_flops(shape: ModelShape, tokens: float) -> float:
    """An MoE layer's dense compute: attention projections, the gate (2 x hidden x experts per
    token) and the shared experts (2 x their weights per token)."""
    return attention_projection_flops(shape, tokens) + tokens * (
        2 * shape.hidden * shape.experts + 2 * shape.shared_params
    )


def score_flops(shape: ModelShape, sequences: float, seq_len: int, phase: Phase) -> float:
    """QK^T and PV: 4 x attn_dim FLOPs per (query, key) pair. Prefill is causal: S(S+1)/2 pairs per
    sequence; decode: one query against seq_len keys per sequence.

    MLA: prefill 2H(head_dim + v_head_dim) per pair plus expanding each cached latent into keys
    and values (2 x kv_lora_rank x H(nope + v) per key); decode attends in latent space,
    2H(2 kv_lora_rank + rope) per pair, plus absorbing kv_b_proj into the query and the output
    (2 x kv_lora_rank x H(nope + v) per query)."""
    pairs = seq_len * (seq_len + 1) / 2 if phase == "prefill" else seq_len
    if not shape.latent_attention:
        return sequences * pairs * 4 * shape.attn_dim
    h, c, rope = shape.heads, shape.kv_lora_rank, shape.rope_head_dim
    expand = 2 * c * h * (shape.head_dim - rope + shape.v_head_dim)
    if phase == "prefill":
        return sequences * (pairs * 2 * h * (shape.head_dim + shape.v_head_dim) + seq_len * expand)
    return sequences * (pairs * 2 * h * (2 * c + rope) + expand)


def dense_mlp_flops(shape: ModelShape, tokens: float) -> float:
    """A dense layer's MLP: 2 x its weights per token."""
    return tokens * 2 * shape.dense_mlp_params


def expert_flops(shape: ModelShape, tokens: float) -> float:
    """tokens x top_k x 2 (FLOPs per MAC) x expert parameters (2 or 3 hidden x ffn matrices)."""
    return tokens * shape.top_k * 2 * shape.expert_params


def flops_per_token(shape: ModelShape, wl: Workload) -> float:
    """Model FLOPs per processed token, all layers (prefill: causal average)."""
    seqs = 1.0
    tokens = wl.seq_len if wl.phase == "prefill" else 1
    scores = score_flops(shape, seqs, wl.seq_len, wl.phase)
    per_layer = projection_flops(shape, tokens) + scores + expert_flops(shape, tokens)
    per_dense = attention_projection_flops(shape, tokens) + scores + dense_mlp_flops(shape, tokens)
    return (shape.layers * per_layer + shape.dense_layers * per_dense) / tokens


def alltoall_bytes_per_token(shape: ModelShape) -> int:
    """Dispatch bytes per token (combine is the same): hidden x dtype bytes x top_k."""
    return shape.hidden * shape.dtype_bytes * shape.top_k


def kv_cache_bytes(shape: ModelShape, wl: Workload) -> float:
    """Whole-batch KV cache, all layers (bytes)."""
    return wl.batch * wl.seq_len * shape.kv_bytes_per_token_layer * shape.total_layers


def weight_bytes(shape: ModelShape) -> float:
    """All parameters once (no replicas), bytes."""
    per_layer = (
        shape.attn_params
        + shape.hidden * shape.experts
        + shape.experts * shape.expert_params
        + shape.shared_params
    )
    per_dense = shape.attn_params + shape.dense_mlp_params
    return (shape.layers * per_layer + shape.dense_layers * per_dense) * shape.dtype_bytes


# --- placement of peers on links -----------------------------------------------------------------


def _node(rank: int, net: NetworkProfile) -> int:
    return rank // net.gpus_per_node


def ep_peer_fractions(layout: Layout, net: NetworkProfile) -> tuple[float, float, float]:
    """(same GPU, other GPU same node, other node) fractions of a rank's EP destinations, under
    uniform routing, for rank 0 (the layout is symmetric up to node boundaries)."""
    peers = [e * layout.tp for e in range(layout.ep)]
    same = sum(1 for r in peers if r == 0)
    intra = sum(1 for r in peers if r != 0 and _node(r, net) == 0)
    return same / layout.ep, intra / layout.ep, (layout.ep - same - intra) / layout.ep


def _link(a: int, b: int, net: NetworkProfile) -> tuple[float, float]:
    """(bandwidth, latency) between ranks a and b."""
    if _node(a, net) == _node(b, net):
        return net.intra_bandwidth, net.intra_latency
    return net.inter_bandwidth, net.inter_latency


# --- per-layer terms -----------------------------------------------------------------------------


def _roof(flops: float, byts: float, peak: float, bw: float) -> tuple[float, bool]:
    t_c, t_m = flops / peak, byts / bw
    return max(t_c, t_m), t_m > t_c


def cross_node_fraction(layout: Layout, net: NetworkProfile, cross_node: float | None) -> float:
    """Fraction of a rank's EP all-to-all bytes that cross nodes: `cross_node` (a plan's
    predicted cross-pod fraction, pods being nodes) where the layout spans nodes, else the
    uniform-routing share of peers on other nodes."""
    _, _, uniform = ep_peer_fractions(layout, net)
    if cross_node is None or uniform == 0.0:
        return uniform
    if not 0.0 <= cross_node <= 1.0:
        raise ValueError(f"cross-node fraction {cross_node} not in [0, 1]")
    return cross_node


def layer_terms(
    shape: ModelShape,
    wl: Workload,
    layout: Layout,
    prof: Profile,
    imbalance: float,
    cross_node: float | None = None,
) -> Terms:
    """Times of one layer for one micro-batch on the slowest rank (seconds). `cross_node`: the
    share of all-to-all bytes that cross nodes (None: uniform routing over the EP ranks)."""
    hw, net, d = prof.hardware, prof.network, shape.dtype_bytes
    m = layout.micro(wl.phase)
    seqs = wl.batch / m / layout.ep  # sequences per GPU per micro-batch
    tok = seqs * (wl.seq_len if wl.phase == "prefill" else 1)  # tokens per GPU per micro-batch
    imb = imbalance if layout.ep > 1 else 1.0
    bw = hw.memory_bandwidth * hw.memory_efficiency

    proj, proj_mem = _roof(
        projection_flops(shape, tok) / layout.tp,
        (shape.attn_params / layout.tp + shape.hidden * shape.experts + _shared(shape, layout)) * d,
        hw.peak_flops * hw.matmul_efficiency,
        bw,
    )
    kv_tokens = seqs * wl.seq_len if wl.phase == "decode" else tok  # decode reads, prefill writes
    scores, kv_mem = _roof(
        score_flops(shape, seqs, wl.seq_len, wl.phase) / layout.tp,
        kv_tokens * shape.kv_bytes_per_token_layer / layout.tp,
        hw.peak_flops * hw.attention_efficiency,
        bw,
    )
    routed_global = tok * layout.ep * shape.top_k  # routings in this micro-batch, whole EP group
    hit = 1.0 - (1.0 - 1.0 / shape.experts) ** routed_global  # expected fraction of experts used
    experts, exp_mem = _roof(
        expert_flops(shape, tok) * imb / layout.tp,
        layout.slots(shape) * hit * shape.expert_params * d / layout.tp,
        hw.peak_flops * hw.expert_efficiency,
        bw,
    )

    a2a = 0.0
    if layout.ep > 1:
        same, _, _ = ep_peer_fractions(layout, net)
        f_inter = cross_node_fraction(layout, net, cross_node)
        f_intra = max(0.0, 1.0 - same - f_inter)
        msg = tok * alltoall_bytes_per_token(shape) * imb  # the hot rank receives/sends imb x mean
        eff = hw.collective_efficiency
        one_way = max(
            f_intra * msg / (net.intra_bandwidth * eff) + (net.intra_latency if f_intra else 0.0),
            f_inter * msg / (net.inter_bandwidth * eff) + (net.inter_latency if f_inter else 0.0),
        )
        a2a = 2 * one_way  # dispatch + combine

    ar = 0.0
    if layout.tp > 1:
        link_bw = min(_link(0, r, net)[0] for r in range(1, layout.tp))
        link_lat = max(_link(0, r, net)[1] for r in range(1, layout.tp))
        n = layout.tp
        msg = tok * shape.hidden * d
        one = 2 * (n - 1) / n * msg / (link_bw * hw.collective_efficiency) + 2 * (n - 1) * link_lat
        ar = 2 * one  # after attention and after the MoE block

    return Terms(proj, scores, experts, a2a, ar, kv_mem, exp_mem, proj_mem)


def _shared(shape: ModelShape, layout: Layout) -> float:
    """Shared expert weights of one layer on one GPU (split over TP like the experts)."""
    return shape.shared_params / layout.tp


def dense_layer_seconds(
    shape: ModelShape, wl: Workload, layout: Layout, prof: Profile, terms: Terms
) -> float:
    """One dense layer for one micro-batch: attention (as an MoE layer's, `terms`) and its MLP on
    every rank, split over TP; its TP all-reduces; no all-to-all."""
    hw, d = prof.hardware, shape.dtype_bytes
    m = layout.micro(wl.phase)
    tok = wl.batch / m / layout.ep * (wl.seq_len if wl.phase == "prefill" else 1)
    compute, _ = _roof(
        (attention_projection_flops(shape, tok) + dense_mlp_flops(shape, tok)) / layout.tp,
        (shape.attn_params + shape.dense_mlp_params) / layout.tp * d,
        hw.peak_flops * hw.matmul_efficiency,
        hw.memory_bandwidth * hw.memory_efficiency,
    )
    return compute + terms.scores + terms.tp_allreduce


def pp_p2p_seconds(shape: ModelShape, wl: Workload, layout: Layout, prof: Profile) -> float:
    """Seconds for one micro-batch's activations to cross a stage boundary (scattered over TP)."""
    if layout.pp == 1:
        return 0.0
    m = layout.micro(wl.phase)
    tok = wl.batch / m / layout.ep * (wl.seq_len if wl.phase == "prefill" else 1)
    stage = layout.ep * layout.tp
    bw, lat = min(_link(r, r + stage, prof.network) for r in range(stage))
    msg = tok * shape.hidden * shape.dtype_bytes / layout.tp
    return msg / (bw * prof.hardware.collective_efficiency) + lat


def memory_per_gpu(
    shape: ModelShape, wl: Workload, layout: Layout, prof: Profile, imbalance: float = 1.0
) -> Memory:
    """Bytes per GPU: weights of its stage, its sequences' KV cache, one micro-batch's working set
    for one layer (scores not materialised: flash-style attention), comm buffers, runtime."""
    d, tp = shape.dtype_bytes, layout.tp
    lps = math.ceil(shape.layers / layout.pp)
    dense = dense_layers_per_stage(shape, layout)
    imb = imbalance if layout.ep > 1 else 1.0
    per_slot = lps * d * shape.expert_params / tp  # one expert of every layer of this stage
    weights = lps * d * (shape.attn_params / tp + shape.hidden * shape.experts)
    weights += layout.slots(shape) * per_slot
    weights += lps * d * _shared(shape, layout)
    weights += dense * d * (shape.attn_params + shape.dense_mlp_params) / tp
    kv = wl.batch / layout.ep * wl.seq_len * shape.kv_bytes_per_token_layer / tp * (lps + dense)
    m = layout.micro(wl.phase)
    tok = wl.batch / m / layout.ep * (wl.seq_len if wl.phase == "prefill" else 1)
    routed = tok * shape.top_k * imb
    attention = 4 * tok * shape.attn_dim / tp
    acts = d * (2 * tok * shape.hidden + attention + routed * shape.ffn_hidden / tp)
    buffers = prof.hardware.runtime_overhead_bytes
    if layout.ep > 1:
        buffers += 2 * routed * shape.hidden * d
    if layout.pp > 1:
        buffers += 2 * tok * shape.hidden * d
    capacity = prof.hardware.memory_capacity
    return Memory(weights, kv, acts, buffers, capacity, per_slot, layout.slots(shape))


def dense_layers_per_stage(shape: ModelShape, layout: Layout) -> int:
    """Dense layers a pipeline stage holds, at most (they lead the first stage in practice)."""
    return math.ceil(shape.dense_layers / layout.pp)
