"""The vectorised Replace against its oracle (`planning.reference`) and against EPLB.

- Building blocks: the numpy count, packing and alignment functions give what the reference's
  give, to the last tie.
- Quality: on random sizes the operator's planner never chooses a costlier layer than the
  reference by the reference's own measure (imbalance + price x slots moved), and with price 0
  never a worse balance.
- Pods: the hierarchical plan is never worse than the flat one by the planner's measure, and
  where it balances as well its tokens leave their pods no more.
- EPLB (moe_local.eplb, DeepSeek's policy): from a previous plan after a +-20% drift, Replace
  balances at least as well (worst layer, mean, and every layer within the noise floor) and
  moves fewer slots, at several sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moe_contract.plan import moved_experts
from moe_local.eplb import eplb_global
from moe_operator.planning import arrays, packing, reference
from moe_operator.planning.align import align
from moe_operator.planning.placement import imbalance, rank_loads, replica_counts
from moe_operator.planning.replace import ReplaceOptions, ideal_imbalance, replace_slots

from .strategies import Case, cases

RELATIVE = 1e-9


def _tuples(array: np.ndarray) -> tuple:
    return tuple(tuple(int(e) for e in rank) for rank in array.tolist())


@settings(max_examples=150, deadline=None)
@given(cases(max_ranks=6, max_slots=3), st.data())
def test_counts_and_packings_equal_the_reference(case: Case, data: st.DataObject) -> None:
    slots = np.asarray(case.plan.slots, dtype=np.int64)
    load = np.asarray(case.loads)
    total = case.ranks * case.slots_per_rank
    fresh = packing.balanced_counts(load, total)
    path, whole = packing.count_path(arrays.replica_counts(slots, case.experts), load, 10**6, 4)
    assert whole
    refined = packing.refine_counts(fresh, load, slots)
    factor = data.draw(st.sampled_from([0.0, 1.0, 1.1, 2.0, math.inf]))
    for layer, (old, row) in enumerate(zip(case.plan.slots, case.loads, strict=True)):
        want = reference.balanced_counts(row, total)
        assert tuple(fresh[layer]) == want
        ref_path = reference.count_path(replica_counts(old, case.experts), row)
        assert [tuple(p) for p in path[layer][: len(ref_path)]] == ref_path
        assert all(tuple(p) == ref_path[-1] for p in path[layer][len(ref_path) :])
        assert tuple(refined[layer]) == reference.refine_counts(want, row, old)
        per = max([sum(row) / case.ranks] + [x / c for x, c in zip(row, want, strict=True)])
        cap = 0.0 if factor == 0 else per * factor
        packed = packing.pack(
            fresh[layer : layer + 1],
            load[layer : layer + 1],
            slots[layer : layer + 1],
            np.array([cap]),
        )
        assert _tuples(packed[0]) == reference.pack(want, row, old, cap)
        aligned = align(packed, slots[layer : layer + 1], case.experts)
        assert _tuples(aligned[0]) == reference.align(_tuples(packed[0]), old)


@settings(max_examples=150, deadline=None)
@given(cases(max_ranks=6, max_slots=3), st.sampled_from([0.0, 0.005, 0.05]))
def test_never_costlier_than_the_reference_at_its_price(case: Case, price: float) -> None:
    fast = replace_slots(case.plan.slots, case.loads, ReplaceOptions(min_gain_per_move=price))
    for layer, (old, row) in enumerate(zip(case.plan.slots, case.loads, strict=True)):
        ref = reference.replace_layer(old, row, reference.ReplaceOptions(price))
        ref_after = imbalance(rank_loads(ref, row))
        ref_cost = ref_after + price * moved_experts(old, ref)
        fast_cost = fast.after[layer] + price * fast.moved[layer]
        assert fast_cost <= ref_cost * (1 + RELATIVE) + 1e-12
        if price == 0:
            assert fast.after[layer] <= ref_after * (1 + RELATIVE)


@settings(max_examples=120, deadline=None)
@given(cases(max_ranks=8, max_slots=3), st.sampled_from([1, 2, 4]))
def test_pods_never_cost_more_nor_send_more_across_at_equal_balance(
    case: Case, per_pod: int
) -> None:
    assume(case.ranks >= 2)
    if case.ranks % per_pod or per_pod >= case.ranks:
        per_pod = 1  # some ranks per pod that divides the world into several pods
    options = ReplaceOptions()
    flat = replace_slots(case.plan.slots, case.loads, options)
    pods = replace_slots(case.plan.slots, case.loads, options, ranks_per_pod=per_pod)
    load = np.asarray(case.loads)
    flat_cross = arrays.cross_pod_fraction(flat.slots, load, per_pod)
    ideal = ideal_imbalance(load, case.ranks, case.slots_per_rank)
    slots = case.ranks * case.slots_per_rank
    for layer in range(case.layers):
        cost_flat = options.cost(flat.after[layer], flat.moved[layer], ideal[layer], slots)
        cost_pods = options.cost(pods.after[layer], pods.moved[layer], ideal[layer], slots)
        lenient = options.cost(
            pods.after[layer] - options.pod_tolerance, pods.moved[layer], ideal[layer], slots
        )
        assert lenient <= cost_flat + 1e-12  # within the tolerance of the flat choice
        if cost_flat <= cost_pods:  # the flat plan is as good: the pods plan keeps more home
            assert pods.cross_pod[layer] <= flat_cross[layer] + 1e-12


def _drift(layers: int, experts: int, ranks: int, per_rank: int, seed: int):
    rng = np.random.default_rng(seed)
    load = rng.lognormal(0, 1, (layers, experts)) * 1000
    previous = eplb_global(load, ranks, per_rank)
    return previous, load * rng.uniform(0.8, 1.2, load.shape)


@pytest.mark.parametrize(
    "layers,experts,ranks,per_rank",
    [(16, 16, 16, 2), (16, 16, 8, 3), (6, 64, 16, 5), (4, 256, 64, 5), (4, 128, 64, 3)],
)
def test_balances_like_eplb_or_better_with_fewer_moves(
    layers: int, experts: int, ranks: int, per_rank: int
) -> None:
    previous, load = _drift(layers, experts, ranks, per_rank, seed=experts + ranks)
    eplb = eplb_global(load, ranks, per_rank)
    eplb_after = arrays.imbalances(arrays.rank_loads(eplb, load))
    eplb_moved = arrays.moved_experts(previous, align(eplb, previous, experts)).sum()
    options = ReplaceOptions()
    result = replace_slots(previous, load, options)
    assert result.after.max() <= eplb_after.max()
    assert result.after.mean() <= eplb_after.mean()
    # a layer may stop short of EPLB by less than what one window's noise makes of imbalance
    assert np.all(result.after <= eplb_after + options.noise_floor)
    assert result.moved.sum() < eplb_moved  # even against EPLB with its ranks renumbered
