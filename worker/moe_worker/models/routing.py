"""Top-K selection under a gate bias, its guard, and its price. Pure torch, no model state.

The plan's gate bias (GatingBias rebalancing) is added to the gate probabilities for top-K
*selection* only; the combine weights stay the unbiased probabilities of the chosen experts. So a
bias changes outputs exactly where it changes a token's selection, and this module says where:

- **Guard.** The bias acts only on tokens whose choice is close: the gap between their K-th and
  (K+1)-th unbiased probability (the *margin*) is below `max_margin`. A confident token keeps the
  experts the model chose, whatever the bias. Inside a close token the bias may only exchange
  experts whose probabilities lie within max_margin / 2 of the boundary between chosen and not
  chosen (the midpoint of the K-th and (K+1)-th probability): experts above that window stay
  chosen, experts below it stay out. So a rerouted assignment gives up less than `max_margin` of
  gate probability, however large the bias. Without a margin (None) every token and every
  expert is open to the bias, as routing was before the guard existed; a bias whose entries all
  lie within +-B reroutes only tokens with a margin below 2B anyway, so the guard matters where
  max_margin < 2B.
- **Price.** Per token, the assignments whose expert is not among the unbiased top-K (*rerouted*,
  0..K) and the gate probability those choices gave up (*lost weight*): the softmax probability,
  over all E experts and before any top-K renormalisation, of the unbiased top-K minus that of
  the chosen experts, in [0, 1). The engine adds them up per layer into
  `moe_gate_rerouted_total{layer}` and `moe_gate_rerouted_weight_total{layer}`.

Sigmoid routers (GLM-4.5, DeepSeek-V3) select on their scores plus the checkpoint's correction
bias, within their best groups (`group_limited`); the plan's bias adds to the correction bias, and
the guard measures margins on the model's own selection scores (`select_scores`). Their price is
counted in sigmoid scores (each in (0, 1), not summing to one).

Legend: N tokens, E experts, K top-k.

    probs_NE          softmax of the gate logits in fp32
    topk_ids_NK       chosen experts (biased selection where the guard allows it)
    unbiased_ids_NK   the model's own top-K
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """Which experts each token visits, and which it would have visited without the bias."""

    topk_ids_NK: Tensor
    unbiased_ids_NK: Tensor
    """Equal to topk_ids_NK (the same tensor) when there is no bias."""


@dataclass(frozen=True)
class Reroutes:
    """The price of a selection, per token."""

    rerouted_N: Tensor
    """int64 [N]: assignments (0..K) whose expert is not among the unbiased top-K."""
    lost_weight_N: Tensor
    """fp32 [N]: unbiased top-K probability mass minus the chosen experts' mass, >= 0."""

    def totals(self) -> tuple[int, float]:
        """(rerouted assignments, lost gate probability) summed over the tokens: what a layer's
        counters grow by."""
        return int(self.rerouted_N.sum()), float(self.lost_weight_N.sum())


def margins(probs_NE: Tensor, top_k: int) -> Tensor:
    """fp32 [N]: K-th minus (K+1)-th largest probability; +inf when K == E (nothing to swap)."""
    if top_k >= probs_NE.shape[-1]:
        return torch.full(probs_NE.shape[:1], float("inf"), device=probs_NE.device)
    values_NK1 = torch.topk(probs_NE, top_k + 1, dim=-1).values
    return values_NK1[:, top_k - 1] - values_NK1[:, top_k]


def select(
    probs_NE: Tensor,
    top_k: int,
    gate_bias_E: Tensor | None = None,
    max_margin: float | None = None,
) -> Selection:
    """Top-K selection under the bias and its guard (see the module docstring).

    Args:
        probs_NE: [N, E] gate probabilities (fp32 softmax).
        gate_bias_E: [E] added to the probabilities for selection; None: no bias.
        max_margin: the guard's width in probability, >= 0; None: no guard.
    Returns:
        Selection with topk_ids_NK [N, K] and unbiased_ids_NK [N, K]. A token whose margin is
        not below max_margin gets exactly its unbiased ids, so it is never rerouted.
    """
    biased_NE = None if gate_bias_E is None else probs_NE + gate_bias_E.float()
    return select_scores(probs_NE, top_k, biased_NE, max_margin)


def select_scores(
    own_NE: Tensor,
    top_k: int,
    biased_NE: Tensor | None = None,
    max_margin: float | None = None,
) -> Selection:
    """`select` over any selection scores: the model's own (`own_NE`: softmax probabilities, or a
    sigmoid router's scores with its correction bias, -inf outside the chosen groups) and the
    same under the plan's bias (`biased_NE`; None: no bias). The guard's margin and window are
    measured on the model's own scores."""
    unbiased_ids_NK = torch.topk(own_NE, top_k, dim=-1).indices
    if biased_NE is None:
        return Selection(unbiased_ids_NK, unbiased_ids_NK)
    if max_margin is None or top_k >= own_NE.shape[-1]:
        return Selection(torch.topk(biased_NE, top_k, dim=-1).indices, unbiased_ids_NK)
    values_NK1 = torch.topk(own_NE, top_k + 1, dim=-1).values
    kth_N1, next_N1 = values_NK1[:, top_k - 1 : top_k], values_NK1[:, top_k:]
    boundary_N1 = (kth_N1 + next_N1) / 2
    score_NE = biased_NE.masked_fill(own_NE >= boundary_N1 + max_margin / 2, float("inf"))
    score_NE = score_NE.masked_fill(own_NE <= boundary_N1 - max_margin / 2, float("-inf"))
    biased_ids_NK = torch.topk(score_NE, top_k, dim=-1).indices
    close_N1 = kth_N1 - next_N1 < max_margin  # ties inside the window cannot leak past this
    return Selection(torch.where(close_N1, biased_ids_NK, unbiased_ids_NK), unbiased_ids_NK)


def group_limited(scores_NE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Scores outside each token's `topk_group` best groups set to -inf (transformers' sigmoid
    routers): the E experts form `n_group` equal groups in order, a group scores the sum of its
    two best. One group (GLM-4.5's default) masks nothing."""
    if n_group == 1:
        return scores_NE
    n, e = scores_NE.shape
    group_scores_NG = scores_NE.view(n, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx_NG = torch.topk(group_scores_NG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask_NG = torch.zeros_like(group_scores_NG).scatter_(1, group_idx_NG, 1)
    score_mask_NE = group_mask_NG.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
    return scores_NE.masked_fill(~score_mask_NE.bool(), float("-inf"))


def price(probs_NE: Tensor, selection: Selection) -> Reroutes:
    """Rerouted assignments and lost gate probability of each token (see the module docstring).

    Computed on sets (one-hot masks), so a token whose chosen experts are its unbiased ones in
    another order costs exactly 0, with no rounding; rounding elsewhere is clamped at 0.
    """
    if selection.topk_ids_NK is selection.unbiased_ids_NK:  # no bias: nothing to count
        zeros_N = torch.zeros(probs_NE.shape[:1], device=probs_NE.device)
        return Reroutes(zeros_N.long(), zeros_N)
    chosen_NE = _mask(probs_NE, selection.topk_ids_NK)
    unbiased_NE = _mask(probs_NE, selection.unbiased_ids_NK)
    rerouted_N = (chosen_NE & ~unbiased_NE).sum(-1)
    lost_weight_N = (probs_NE * (unbiased_NE.float() - chosen_NE.float())).sum(-1).clamp_min(0)
    return Reroutes(rerouted_N, lost_weight_N)


def _mask(probs_NE: Tensor, ids_NK: Tensor) -> Tensor:
    """bool [N, E]: True where expert e is among token n's ids."""
    mask_NE = torch.zeros(probs_NE.shape, dtype=torch.bool, device=probs_NE.device)
    return mask_NE.scatter_(1, ids_NK, True)
