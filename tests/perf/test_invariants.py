"""Properties: more imbalance never helps; more bandwidth or FLOP/s never hurts; memory grows with
sequence length."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_operator.perf import ModelShape, Workload, parse_layout, predict
from moe_operator.perf.profiles import load_profile

H100 = load_profile("h100-sxm")
SEED = ModelShape.seed()
layouts = st.sampled_from(["ep16", "tp8pp2", "ep8tp2", "ep4tp2pp2", "ep16s2", "tp4pp4m2", "ep2"])
phases = st.sampled_from(["prefill", "decode"])
overlaps = st.floats(0.0, 1.0)
factors = st.floats(1.0, 8.0)
wls = st.builds(Workload, batch=st.integers(1, 256), seq_len=st.integers(1, 20_000), phase=phases)


def tps(wl, lay, prof=H100, imb=1.0, ov=0.0):
    return predict(SEED, wl, parse_layout(lay), prof, imb, ov).tokens_per_s


@settings(max_examples=200, deadline=None)
@given(wls, layouts, overlaps, st.floats(1.0, 4.0), factors)
def test_more_imbalance_never_more_throughput(wl, lay, ov, imb, more):
    assert tps(wl, lay, imb=imb * more, ov=ov) <= tps(wl, lay, imb=imb, ov=ov) * (1 + 1e-12)


@settings(max_examples=200, deadline=None)
@given(
    wls,
    layouts,
    overlaps,
    factors,
    st.sampled_from(["intra_bandwidth", "inter_bandwidth", "memory_bandwidth", "peak_flops"]),
)
def test_more_bandwidth_or_flops_never_less_throughput(wl, lay, ov, f, field):
    if field == "peak_flops" or field == "memory_bandwidth":
        faster = replace(
            H100, hardware=replace(H100.hardware, **{field: getattr(H100.hardware, field) * f})
        )
    else:
        faster = replace(
            H100, network=replace(H100.network, **{field: getattr(H100.network, field) * f})
        )
    assert tps(wl, lay, faster, ov=ov) >= tps(wl, lay, ov=ov) * (1 - 1e-12)


@settings(max_examples=100, deadline=None)
@given(wls, layouts, overlaps, factors)
def test_higher_efficiency_never_less_throughput(wl, lay, ov, f):
    hw = H100.hardware
    better = replace(
        H100,
        hardware=replace(
            hw,
            expert_efficiency=min(1.0, hw.expert_efficiency * f),
            attention_efficiency=min(1.0, hw.attention_efficiency * f),
        ),
    )
    assert tps(wl, lay, better, ov=ov) >= tps(wl, lay, ov=ov) * (1 - 1e-12)


@settings(max_examples=100, deadline=None)
@given(wls, layouts, st.integers(1, 10_000))
def test_memory_grows_with_sequence_length(wl, lay, extra):
    longer = replace(wl, seq_len=wl.seq_len + extra)
    m0 = predict(SEED, wl, parse_layout(lay), H100).memory
    m1 = predict(SEED, longer, parse_layout(lay), H100).memory
    assert m1.total > m0.total and m1.kv_cache > m0.kv_cache


@settings(max_examples=100, deadline=None)
@given(wls, layouts)
def test_more_overlap_never_slower(wl, lay):
    assert tps(wl, lay, ov=1.0) >= tps(wl, lay, ov=0.0) * (1 - 1e-12)


@settings(max_examples=150, deadline=None)
@given(wls, st.sampled_from(["ep16", "ep32s2", "ep64s5"]), st.floats(0.2, 1.0), st.floats(0.5, 1.0))
def test_fewer_bytes_across_nodes_never_less_throughput(wl, lay, cross, less):
    # NVLink and InfiniBand carry their parts at once; while a tenth or more of the bytes cross
    # (IB is 9x slower on H100 nodes) IB is the slower part, and moving bytes off it helps.
    layout = parse_layout(lay)
    fewer = predict(SEED, wl, layout, H100, cross_node=cross * less)
    more = predict(SEED, wl, layout, H100, cross_node=cross)
    assert fewer.tokens_per_s >= more.tokens_per_s * (1 - 1e-12)
    assert fewer.cross_node == cross * less


def test_uniform_routing_is_the_default_cross_node_share():
    layout = parse_layout("ep16")  # two nodes of 8: half of a rank's peers on the other node
    default = predict(SEED, Workload(), layout, H100)
    assert default.cross_node == 0.5
    assert (
        predict(SEED, Workload(), layout, H100, cross_node=0.5).tokens_per_s == default.tokens_per_s
    )
    single = predict(SEED, Workload(), parse_layout("ep8"), H100, cross_node=0.3)
    assert single.cross_node == 0.0  # one node: nothing crosses whatever a plan says
