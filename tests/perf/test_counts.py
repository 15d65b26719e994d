"""The model against hand-computed FLOPs, bytes, memory and communication times."""

from __future__ import annotations

import pytest

from moe_operator.perf import Layout, Workload, parse_layout, predict, predicted_gain
from moe_operator.perf.model import (
    alltoall_bytes_per_token,
    ep_peer_fractions,
    expert_flops,
    flops_per_token,
    kv_cache_bytes,
    layer_terms,
    memory_per_gpu,
    projection_flops,
    score_flops,
    weight_bytes,
)
from tests.perf.util import round_profile


def test_flop_counts_of_the_seed_shape(seed):
    assert expert_flops(seed, 1) == 2 * 2 * 2 * 4096 * 16384 == 536_870_912
    assert projection_flops(seed, 1) == 8 * 4096 * 4096 + 2 * 4096 * 16 == 134_348_800
    assert score_flops(seed, 1, 10_000, "prefill") == 10_000 * 10_001 / 2 * 4 * 4096
    assert score_flops(seed, 1, 10_000, "decode") == 10_000 * 4 * 4096
    per_token = 16 * (134_348_800 + 536_870_912 + 10_001 / 2 * 4 * 4096)
    assert flops_per_token(seed, Workload()) == pytest.approx(per_token)


def test_bytes_of_the_seed_shape(seed):
    assert seed.expert_params == 134_217_728  # the seed's "~134M per expert"
    assert alltoall_bytes_per_token(seed) == 4096 * 2 * 2
    assert seed.kv_bytes_per_token_layer == 2 * 32 * 128 * 2 == 16_384
    assert kv_cache_bytes(seed, Workload()) == 128 * 10_000 * 16_384 * 16 == 335_544_320_000
    assert weight_bytes(seed) == 16 * 2 * (67_108_864 + 65_536 + 16 * 134_217_728)


def test_memory_per_gpu_ep16(seed, h100):
    mem = memory_per_gpu(seed, Workload(), Layout(ep=16), h100)
    assert mem.weights == 16 * 2 * (67_108_864 + 65_536 + 134_217_728) == 6_444_548_096
    assert mem.kv_cache == 8 * 10_000 * 16_384 * 16 == 20_971_520_000
    assert mem.fits


def test_memory_flags_what_does_not_fit(seed, h100):
    long = Workload(seq_len=100_000)
    assert not memory_per_gpu(seed, long, Layout(ep=16), h100).fits


def test_ep_peer_fractions():
    net = round_profile(gpus_per_node=8).network
    assert ep_peer_fractions(Layout(ep=16), net) == (1 / 16, 7 / 16, 8 / 16)
    assert ep_peer_fractions(Layout(ep=4, tp=2), net) == (1 / 4, 3 / 4, 0.0)


def test_alltoall_time_by_hand(tiny):
    # ep 4 over nodes of 2: per GPU 2 tokens x 4 B = 8 B; 1/4 over NVLink (100 B/s), 2/4 over IB
    # (10 B/s): one way max(0.02, 0.4) = 0.4 s; dispatch + combine 0.8 s.
    wl = Workload(batch=8, seq_len=1, phase="decode")
    terms = layer_terms(tiny, wl, Layout(ep=4), round_profile(2), 1.0)
    assert terms.ep_alltoall == pytest.approx(0.8)
    hot = layer_terms(tiny, wl, Layout(ep=4), round_profile(2), 1.5)
    assert hot.ep_alltoall == pytest.approx(1.2)


def test_allreduce_time_by_hand(tiny):
    # tp 4 in one node: message 8 tokens x 4 B = 32 B; ring 2 x 3/4 x 32 = 48 B at 100 B/s = 0.48 s,
    # two per layer.
    wl = Workload(batch=8, seq_len=1, phase="decode")
    terms = layer_terms(tiny, wl, Layout(tp=4), round_profile(4), 1.0)
    assert terms.tp_allreduce == pytest.approx(0.96)


def test_decode_seed_is_kv_bound(seed, h100):
    terms = layer_terms(seed, Workload(phase="decode"), Layout(ep=16), h100, 1.0)
    assert terms.kv_bound
    assert terms.scores == pytest.approx(8 * 10_000 * 16_384 / (3.35e12 * 0.85))


def test_prefill_bubble_fraction(seed, h100):
    p = predict(seed, Workload(), parse_layout("tp8pp2m8"), h100)
    assert dict(p.breakdown)["PP bubble"] / p.seconds == pytest.approx(1 / 9)


def test_overlap_one_takes_the_max(seed, h100):
    p0 = predict(seed, Workload(), Layout(ep=16), h100, overlap=0.0)
    p1 = predict(seed, Workload(), Layout(ep=16), h100, overlap=1.0)
    t = p0.terms
    assert p0.seconds == pytest.approx(16 * (t.compute + t.comm))
    assert p1.seconds == pytest.approx(16 * max(t.compute, t.comm))


def test_breakdown_sums_to_the_total(seed, h100):
    for phase in ("prefill", "decode"):
        for lay in ("ep16", "tp8pp2", "ep4tp2pp2"):
            p = predict(seed, Workload(phase=phase), parse_layout(lay), h100, 1.3, 0.5)
            assert sum(v for _, v in p.breakdown) == pytest.approx(p.seconds)


def test_seed_headline_bounds(seed, h100):
    ep = predict(seed, Workload(), Layout(ep=16), h100)
    assert ep.bound == "expert GEMMs (FLOPs)"
    dec = predict(seed, Workload(phase="decode"), Layout(ep=16), h100)
    assert dec.bound == "KV cache reads (HBM)"
    assert dec.tpot_s > 6.26e-3  # KV alone at 100 % of HBM bandwidth: 335.5 GB / 53.6 TB/s


def test_predicted_gain(seed, h100):
    ratio, secs = predicted_gain(seed, Layout(ep=16), h100, 1.5, 1.1, 3, 268_435_456)
    assert ratio > 1.0
    assert secs == pytest.approx(3 * (268_435_456 / (50e9 * 0.8) + 10e-6))
    same, none = predicted_gain(seed, Layout(ep=16), h100, 1.2, 1.2, 0, 1.0)
    assert same == pytest.approx(1.0) and none == 0.0


@pytest.mark.parametrize(
    "text,want",
    [
        ("ep16", Layout(ep=16)),
        ("tp8pp2", Layout(tp=8, pp=2)),
        ("ep4tp2s3m4", Layout(ep=4, tp=2, slots_per_rank=3, micro_batches=4)),
    ],
)
def test_parse_layout(text, want):
    assert parse_layout(text) == want


@pytest.mark.parametrize("bad", ["", "ep", "x16", "ep16zz"])
def test_parse_layout_rejects(bad):
    with pytest.raises(ValueError):
        parse_layout(bad)


def test_layout_too_small_for_the_experts(seed, h100):
    with pytest.raises(ValueError, match="slots"):
        predict(seed, Workload(), Layout(ep=4, slots_per_rank=2), h100)


def test_one_more_expert_slot_costs_one_expert_of_every_layer(seed, h100):
    mem = memory_per_gpu(seed, Workload(), Layout(ep=16), h100)
    assert mem.per_slot == 16 * 2 * 134_217_728 == 4_294_967_296  # the 4.3 GB
    assert mem.slots == 1
    grown = memory_per_gpu(seed, Workload(), Layout(ep=16, slots_per_rank=2), h100)
    assert grown.weights - mem.weights == mem.per_slot
    assert mem.spare_slots == int((mem.capacity - mem.total) // mem.per_slot)
    assert grown.spare_slots == mem.spare_slots - 1
    tp2 = memory_per_gpu(seed, Workload(), Layout(ep=8, tp=2), h100)
    assert tp2.per_slot == mem.per_slot / 2  # each expert's FFN is split over TP


def test_nothing_spare_when_nothing_fits(seed, h100):
    assert memory_per_gpu(seed, Workload(seq_len=100_000), Layout(ep=16), h100).spare_slots == 0
