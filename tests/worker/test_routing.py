"""The router's guard and price: properties over random gate scores, recounted by hand.

`route` / `route_priced` (models.base) over `select` / `price` (models.routing): a bias moves
top-K selection only where the guard allows, and the price counts exactly what moved.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.models import route, route_priced
from moe_worker.models.routing import margins, price, select


@st.composite
def scores(
    draw: st.DrawFn, ties: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int, float | None]:
    """(logits [N, E], bias [E], K, max_margin): seeded random; with `ties`, coarse logits now
    and then give exactly equal probabilities."""
    experts = draw(st.integers(2, 12))
    tokens = draw(st.integers(1, 64))
    top_k = draw(st.integers(1, experts))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator) * draw(st.sampled_from([0.3, 1, 3]))
    if ties and draw(st.booleans()):  # coarse logits: exact ties between probabilities
        logits = logits.round()
    scale = draw(st.sampled_from([0.01, 0.05, 0.3, 1.0]))
    bias = (torch.rand(experts, generator=generator) * 2 - 1) * scale
    margin = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0])))
    return logits, bias, top_k, margin


def _recount(
    probs: list[list[float]], chosen: list[list[int]], top_k: int
) -> tuple[list[int], list[float]]:
    """Rerouted assignments and lost probability per token, from the scores, in plain Python
    (scores without ties: the model's own top-K is then one set)."""
    rerouted, lost = [], []
    for row, ids in zip(probs, chosen, strict=True):
        unbiased = set(sorted(range(len(row)), key=lambda e: -row[e])[:top_k])
        rerouted.append(len(set(ids) - unbiased))
        lost.append(sum(row[e] for e in unbiased) - sum(row[e] for e in ids))
    return rerouted, lost


@settings(max_examples=120, deadline=None)
@given(scores())
def test_a_token_whose_margin_is_not_below_max_margin_is_never_rerouted(case) -> None:
    logits, bias, top_k, margin = case
    probs = torch.softmax(logits, -1)
    selection = select(probs, top_k, bias, margin)
    rerouted = price(probs, selection).rerouted_N
    if margin is not None:
        confident = margins(probs, top_k) >= margin
        assert (rerouted[confident] == 0).all()
        chosen = selection.topk_ids_NK.sort(-1).values
        unbiased = selection.unbiased_ids_NK.sort(-1).values
        assert torch.equal(chosen[confident], unbiased[confident])


@settings(max_examples=120, deadline=None)
@given(scores())
def test_a_rerouted_assignment_loses_less_than_max_margin(case) -> None:
    logits, bias, top_k, margin = case
    probs = torch.softmax(logits, -1)
    reroutes = price(probs, select(probs, top_k, bias, margin))
    assert (reroutes.lost_weight_N >= 0).all()
    assert (reroutes.rerouted_N <= top_k).all()
    if margin is not None:
        bound = reroutes.rerouted_N.float() * margin + 1e-6
        assert (reroutes.lost_weight_N <= bound).all()


@settings(max_examples=120, deadline=None)
@given(scores(ties=False))
def test_the_price_equals_a_recount_from_the_scores(case) -> None:
    logits, bias, top_k, margin = case
    routing, reroutes = route_priced(logits, top_k, gate_bias_E=bias, max_margin=margin)
    probs = torch.softmax(logits.float(), -1)
    rerouted, lost = _recount(probs.tolist(), routing.topk_ids_NK.tolist(), top_k)
    assert reroutes.rerouted_N.tolist() == rerouted
    assert reroutes.lost_weight_N.tolist() == pytest.approx(lost, abs=1e-6)
    total_rerouted, total_lost = reroutes.totals()
    assert total_rerouted == sum(rerouted)
    assert total_lost == pytest.approx(sum(lost), abs=1e-5)


@settings(max_examples=100, deadline=None)
@given(scores())
def test_the_bias_moves_selection_only_and_route_is_route_priced(case) -> None:
    logits, bias, top_k, margin = case
    routing = route(logits, top_k, gate_bias_E=bias, max_margin=margin)
    priced, _ = route_priced(logits, top_k, gate_bias_E=bias, max_margin=margin)
    assert torch.equal(routing.topk_ids_NK, priced.topk_ids_NK)
    probs = torch.softmax(logits.float(), -1)
    chosen = torch.gather(probs, 1, routing.topk_ids_NK)
    torch.testing.assert_close(routing.topk_weights_NK, chosen / chosen.sum(-1, keepdim=True))


def test_without_a_guard_the_bias_acts_on_every_token_as_before() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.1, 3.0, 0.2]])
    bias = torch.tensor([-1.0, 0.0, 0.0, 1.0])
    ids = route(logits, 2, gate_bias_E=bias).topk_ids_NK
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids, torch.topk(probs + bias, 2).indices)  # what route always did
    assert torch.equal(route(logits, 2).topk_ids_NK, torch.topk(probs, 2).indices)


def test_the_guard_keeps_confident_tokens_and_moves_close_ones_within_the_window() -> None:
    # token 0: 2nd and 3rd choice nearly tied; token 1: a clear top-2
    probs = torch.tensor([[0.50, 0.21, 0.20, 0.09], [0.50, 0.40, 0.05, 0.05]])
    bias = torch.tensor([-0.5, -0.5, 0.5, 0.5])
    selection = select(probs, 2, bias, max_margin=0.05)
    assert sorted(selection.topk_ids_NK[0].tolist()) == [0, 2]  # 1 <-> 2 swapped; 0 is locked
    assert sorted(selection.topk_ids_NK[1].tolist()) == [0, 1]  # margin 0.35: untouched
    reroutes = price(probs, selection)
    assert reroutes.rerouted_N.tolist() == [1, 0]
    assert reroutes.lost_weight_N.tolist() == pytest.approx([0.01, 0.0], abs=1e-6)
    unguarded = select(probs, 2, bias)  # the same bias, no guard: both tokens lose experts
    assert price(probs, unguarded).rerouted_N.tolist() == [2, 2]


def test_with_k_equal_to_e_nothing_can_be_rerouted() -> None:
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    _, reroutes = route_priced(logits, 3, gate_bias_E=torch.tensor([1.0, 0.0, -1.0]))
    assert reroutes.totals() == (0, 0.0)
    assert torch.isinf(margins(torch.softmax(logits, -1), 3)).all()
