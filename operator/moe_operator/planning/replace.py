"""Replace: output-preserving rebalancing by replicating hot experts and re-packing slots.

In the spirit of DeepSeek's EPLB (replicate the hottest, pack greedily) but aware of the current
placement: moving a slot means copying an expert's weights to another rank, so every candidate
is charged for the slots it moves. Vectorised with numpy over all layers and candidates at once
(`packing`, `align`, `arrays`); `planning.reference` is the first, readable implementation, and
the tests hold this one to it. Shapes: L layers, R ranks, S slots per rank, E logical experts,
N = R * S slots per layer.

For each layer:

1. Replica counts [E] (every expert >= 1, summing to N): points on the path of single-replica
   transfers from the current counts towards balance (`packing.count_path`), the from-scratch
   balanced counts, and, where it fits the work budget, those hill-climbed on the max rank load
   of a fresh packing.
2. Packing [R][S] for each counts and load cap: keep current slots under the cap (heaviest
   first), then place the rest heaviest first on the least-loaded rank with a free slot (LPT);
   with pods, on a rank of a pod without a replica of that expert where one is free. Caps go from
   0 (a fresh packing) through the lower bound up to unlimited (keep all). Ranks are renumbered to
   overlap the current placement most (`align`).
3. Choice: the candidate of least cost (`ReplaceOptions.cost`: the log of the gap between its
   imbalance and the least the layer's slots allow, plus a price per slot moved relative to the
   layer's slots) among those that strictly lower the max rank load, or the current layer when
   none is worth its moves: a move must cut a share of the layer's remaining gap, so the rule
   means the same on 16 experts and on 256. With pods, among the candidates within
   `pod_tolerance` of imbalance of the best, the one whose tokens leave their pod least.

Growing (`replace_slots(slots_per_rank=...)` above the plan's): the new slots first hold copies
of experts their rank holds (`grow_slots`), which move no weights but may move load. The layer
served where nothing pays keeps its rank loads where it can; the candidates start from copies
of every rank's heaviest replica (free replicas of the hot experts). No layer may end up
carrying more than it does now (`Replaced.fits`).

Work budget: with all counts on the path, 14 caps, the count refinement and every candidate
aligned (the reference's candidate set) where L x points x caps x N x R allows; at DeepSeek scale
a geometric sample of the path, 8 caps, no refinement, and only fresh packings aligned (a packing
that keeps slots is anchored to its ranks already). Memory: candidates go in chunks of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_operator.planning import arrays, candidates, packing
from moe_operator.planning.placement import LayerSlots

Slots = tuple[tuple[tuple[int, ...], ...], ...]
"""slots [L][R][S]."""


@dataclass(frozen=True)
class ReplaceOptions:
    """Tuning of the balance-versus-moves trade-off of `Replace`.

    The relative rule (the default): a layer's cost is `ln(gap + noise) + min_gain_fraction x
    moved / N`, gap = imbalance - the least imbalance its slots allow. Moving a fraction m of
    the layer's N slots is worth it only where it cuts the remaining gap (plus a noise floor) by
    a factor exp(min_gain_fraction x m) at least: with the default 1, moving every slot must cut
    it to 1/e, a tenth of the slots to 0.9. Each slot carries about 1/N of a layer's load and the
    gap is the layer's own, so the rule means the same on 16 experts and on 256.
    """

    min_gain_fraction: float = 1.0
    """Relative rule: the share (ln) of the remaining gap moving all N slots must cut; 0 takes
    the best balance found whatever it moves."""
    noise_floor: float = 0.01
    """Imbalance below which a remaining gap is not worth chasing (one window's noise)."""
    min_gain_per_move: float | None = None
    """An absolute rule instead: cost `imbalance + min_gain_per_move x moved` (the rule before
    the relative one, and the reference implementation's); None: the relative rule."""
    pod_tolerance: float = 0.005
    """Imbalance (max/mean) the planner gives up at most, against the best candidate, for a
    placement whose tokens leave their pod less (only with pods)."""

    def __post_init__(self) -> None:
        for name in ("min_gain_fraction", "noise_floor", "min_gain_per_move", "pod_tolerance"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name}: must be finite and >= 0, got {value}")
        if self.noise_floor <= 0:
            raise ValueError(f"noise_floor: must be > 0, got {self.noise_floor}")

    def rule(self) -> str:
        """The stopping rule in words, for notes."""
        if self.min_gain_per_move is not None:
            return f"a gain of {self.min_gain_per_move:g} imbalance per slot moved"
        return (
            f"a move must cut the layer's gap to its ideal by {self.min_gain_fraction:g}/N of "
            "itself"
        )

    def cost(
        self, after: np.ndarray, moved: np.ndarray, ideal: np.ndarray, slots: int
    ) -> np.ndarray:
        """What a layer at imbalance `after` reached by moving `moved` slots costs; arrays of
        the same shape, `ideal` broadcast against them, `slots` = N. Lower is better."""
        if self.min_gain_per_move is not None:
            return after + self.min_gain_per_move * moved
        gap = np.maximum(after - ideal, 0.0) + self.noise_floor
        return np.log(gap) + self.min_gain_fraction * moved / slots


@dataclass(frozen=True)
class Pricing:
    """What `ReplaceOptions.cost` needs of each layer, fixed for one planning run (so that plans
    of different slots per rank are priced alike)."""

    ideal: np.ndarray
    """ideal_L: the least imbalance the layer's slots allow (`ideal_imbalance`)."""
    slots: int
    """N: slots of a layer of the current plan."""


@dataclass(frozen=True)
class Replaced:
    """Replace's choice for every layer."""

    slots: np.ndarray
    """slots_LRS chosen (the current layer, or grown as `Grown.kept`, where nothing was worth
    its moves)."""
    before: np.ndarray
    """imbalance_L of the current layers (under the same dispatch model)."""
    after: np.ndarray
    """imbalance_L of the chosen layers."""
    moved: np.ndarray
    """moved_L: experts new to their ranks."""
    cross_pod: np.ndarray
    """fraction_L of assignments leaving their pod (NaN without pods)."""
    fits: np.ndarray
    """fits_L: whether the chosen layer carries at most `before` (max rank load). Always
    without growth; a grown layer fits where `Grown.kept` keeps its loads or a candidate gets
    back under them."""

    def as_tuples(self) -> Slots:
        return tuple(
            tuple(tuple(int(e) for e in rank) for rank in layer) for layer in self.slots.tolist()
        )


def nothing_to_replicate(num_experts: int, world_size: int, slots_per_rank: int) -> bool:
    """True for the seed's layout: one slot per rank and E == R leave no spare slot to use."""
    return slots_per_rank == 1 and num_experts == world_size


@dataclass(frozen=True)
class Grown:
    """Layers given more slots per rank before anything moves: two fills of the new slots, both
    copies of experts their rank holds already, so no weights move between ranks.

    A local copy still moves load: every replica carries load / replicas, so k more replicas of
    expert e (c in all, m of them on rank r) give r l_e k (c - m) / (c (c + k)) more, taken from
    the other ranks that hold e (one of four replicas is 1/4 of e, two of seven 2/7).
    """

    kept: np.ndarray
    """slots_LRS': each rank copies the expert whose copies add it least: nothing, every rank
    load kept, for an expert without load or one whose replicas are all on the rank (ties: the
    rank's first slot). The layer served where nothing is worth its moves."""
    hot: np.ndarray
    """slots_LRS': each rank copies its heaviest replica (more replicas of the hot experts, free
    to keep). Where the candidates start."""


def grow_slots(slots_LRS: np.ndarray, load_LE: np.ndarray, slots_per_rank: int) -> Grown:
    """The layers with `slots_per_rank` slots per rank, the first S of every rank as they are.

    Args:
        slots_LRS: current logical expert ids.
        load_LE: tokens per expert.
        slots_per_rank: S' >= S.
    """
    layers, _ranks, per_rank = slots_LRS.shape
    added = slots_per_rank - per_rank
    if added < 0:
        raise ValueError(f"slots_per_rank: {slots_per_rank} would drop slots; slots only grow")
    flat = slots_LRS.reshape(layers, -1)
    replicas = arrays.replica_counts(slots_LRS, load_LE.shape[1])
    count = np.take_along_axis(replicas, flat, axis=1).reshape(slots_LRS.shape)  # c
    load = np.take_along_axis(load_LE, flat, axis=1).reshape(slots_LRS.shape)  # l
    here = (slots_LRS[:, :, :, None] == slots_LRS[:, :, None, :]).sum(axis=3)  # m
    adds = load * (added * (count - here)) / (count * (count + added))

    def fill(pick_LR: np.ndarray) -> np.ndarray:
        copied = np.take_along_axis(slots_LRS, pick_LR[:, :, None], axis=2)
        return np.concatenate([slots_LRS, np.repeat(copied, added, axis=2)], axis=2)

    return Grown(kept=fill(adds.argmin(axis=2)), hot=fill((load / count).argmax(axis=2)))


def ideal_imbalance(load_LE: np.ndarray, world_size: int, slots_per_rank: int) -> np.ndarray:
    """ideal_L: the least imbalance N slots allow, max(mean, heaviest replica at balanced
    counts) / mean (1 for a layer without load)."""
    counts = packing.balanced_counts(load_LE, world_size * slots_per_rank)
    heaviest = (load_LE / counts).max(axis=1)
    mean = load_LE.sum(axis=1) / world_size
    safe = np.where(mean > 0, mean, 1.0)
    return np.where(mean > 0, np.maximum(mean, heaviest) / safe, 1.0)


def replace_slots(
    slots: Sequence[LayerSlots],
    expert_load: Sequence[Sequence[float]],
    options: ReplaceOptions | None = None,
    *,
    ranks_per_pod: int | None = None,
    pricing: Pricing | None = None,
    slots_per_rank: int | None = None,
) -> Replaced:
    """Rebalance every layer (see the module).

    Args:
        slots: [L][R][S] current placement; every expert has a slot in every layer.
        expert_load: [L][E] tokens per expert over the window.
        ranks_per_pod: ranks of one pod (the dispatcher keeps tokens in their pod where it can);
            None: pods unknown, the flat model.
        pricing: the layers' ideal and slot count for the cost; None: those of `slots`.
        slots_per_rank: S' > S grows every layer to S' slots per rank (`grow_slots`): no layer
            may then carry more than it does now, and one that must (`Replaced.fits`) keeps
            the grown layer; None or S: as many as now.
    """
    options = options or ReplaceOptions()
    current = np.asarray(slots, dtype=np.int64)
    load = np.asarray(expert_load, dtype=np.float64)
    _layers, ranks, per_rank = current.shape
    pods = ranks_per_pod if ranks_per_pod is not None and ranks_per_pod < ranks else None
    before = arrays.imbalances(arrays.rank_loads(current, load))
    if pricing is None:
        pricing = Pricing(ideal_imbalance(load, ranks, per_rank), ranks * per_rank)
    if slots_per_rank is None or slots_per_rank == per_rank:
        scored = candidates.build(current, load, pods)
        return _choose(scored, current, before, options, pricing, grown=False)
    grown = grow_slots(current, load, slots_per_rank)
    scored = candidates.build(grown.hot, load, pods, also=grown.kept[:, None])
    return _choose(scored, grown.kept, before, options, pricing, grown=True)


def _choose(
    scored: candidates.Scored,
    stay: np.ndarray,
    before: np.ndarray,
    options: ReplaceOptions,
    pricing: Pricing,
    *,
    grown: bool,
) -> Replaced:
    """Per layer the candidate of least cost among those that strictly lower the max rank load
    of `stay` (ties: fewer moves, then lower imbalance, then the first), or `stay`, the layer
    that is served where nothing is worth its moves: the current one, or the current one grown
    (where a candidate may move nothing and yet differ from it). No choice carries more than
    `before`, the current layer: where `stay` does (a grown layer whose copies raised a rank),
    the least costly candidate that does not."""
    layers = len(before)
    now = arrays.imbalances(arrays.rank_loads(stay, scored.load))
    ideal = pricing.ideal[:, None]
    cost = options.cost(scored.after, scored.moved, ideal, pricing.slots)
    stay_cost = options.cost(now, np.zeros(layers), pricing.ideal, pricing.slots)
    can_stay = now <= before * (1 + arrays.RELATIVE_EPSILON)
    gains = scored.after < now[:, None] * (1 - arrays.RELATIVE_EPSILON)
    gains &= cost < stay_cost[:, None]
    valid = (scored.after <= before[:, None] * (1 + arrays.RELATIVE_EPSILON)) & (
        gains | ~can_stay[:, None]
    )
    if not grown:
        valid &= scored.moved > 0  # a candidate that moves nothing is the current layer
    order = np.lexsort((scored.after, scored.moved, np.where(valid, cost, np.inf)), axis=1)
    best = order[:, 0]
    every = arrays.rows(layers)
    changed = valid[every, best]
    cross_now = arrays.cross_pod_fraction(stay, scored.load, scored.pods)
    cross = scored.cross(np.zeros_like(valid))
    if scored.pods is not None:
        # near: would be chosen were it pod_tolerance better balanced (the current layer too)
        best_cost = np.where(changed, cost[every, best], stay_cost)
        lenient = options.cost(
            scored.after - options.pod_tolerance, scored.moved, ideal, pricing.slots
        )
        near = valid & (lenient <= best_cost[:, None])
        stay_lenient = options.cost(
            now - options.pod_tolerance, np.zeros(layers), pricing.ideal, pricing.slots
        )
        cross = np.where(near, scored.cross(near), np.inf)
        pick = np.lexsort((scored.after, scored.moved, cost, cross), axis=1)[:, 0]
        found = near[every, pick]
        stays = (stay_lenient <= best_cost) & (~found | (cross_now < cross[every, pick]))
        best, changed = np.where(found, pick, best), found & ~(stays & can_stay)
    return Replaced(
        slots=np.where(changed[:, None, None], scored.slots[every, best], stay),
        before=before,
        after=np.where(changed, scored.after[every, best], now),
        moved=np.where(changed, scored.moved[every, best], 0),
        cross_pod=np.where(changed, cross[every, best], cross_now),
        fits=changed | can_stay,
    )
