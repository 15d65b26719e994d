"""The reference Replace: the first, readable implementation (stdlib only), kept as the oracle.

The operator plans with the vectorised `planning.replace`, which builds the same candidates over
all layers at once with numpy (within a work budget) and chooses with a stopping rule relative to
each layer; its tests hold it to this module: never a costlier plan by this module's own measure
(imbalance + `min_gain_per_move` x slots moved) where it is given the same price.

Pure functions over plain sequences (stdlib only), in the spirit of DeepSeek's EPLB, but aware of
the current placement: moving a slot means copying an expert's weights to another rank, so every
candidate placement is charged for the slots it moves. Shapes (see `placement`):
L = layers, R = ranks, S = slots per rank, E = logical experts, N = R * S slots per layer.

For each layer independently:

1. Replica counts [E] (every expert >= 1, summing to N): the current counts, then the path of
   single-replica transfers from the coolest replicated expert to the hottest one while that lowers
   the hottest per-replica load, the from-scratch balanced counts (one replica each, then each
   spare slot to the expert with the highest load per replica), and those counts hill-climbed on
   the max rank load of a fresh packing.
2. Packing [R][S]: for a load cap, keep every current slot whose expert still needs a replica and
   whose rank stays under the cap (heaviest replicas first), then place the remaining replicas
   heaviest first on the least-loaded rank with a free slot (LPT). Caps go from 0 (a fresh
   packing) through the lower bound (no rank can carry less than the mean or the heaviest
   replica) up to unlimited (keep all). Each packing's ranks are then renumbered to overlap the
   current placement most (`align`): rank loads do not depend on the numbering, moves do.
3. Choice: the current layer, or the candidate minimising
   `imbalance_after + min_gain_per_move * slots_moved` among those that strictly lower the max rank
   load. So a move is made only if it buys at least `min_gain_per_move` of imbalance (max/mean),
   the max rank load never increases, and an already balanced layer is left as it is.

With one slot per rank and as many experts as ranks nothing can be replicated, and every placement
is a permutation with the same set of rank loads: Replace then leaves the plan as it is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from moe_contract.plan import moved_experts
from moe_operator.planning.placement import (
    LayerSlots,
    imbalance,
    rank_loads,
    replica_counts,
)

Slots = tuple[tuple[tuple[int, ...], ...], ...]
"""slots [L][R][S]."""

_CAP_FACTORS = (0.0, 1.0, 1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, math.inf)
"""Load caps tried for keeping current slots, as multiples of the layer's lower bound (0: keep
nothing, a fresh LPT packing; inf: keep all that the counts allow)."""

_RELATIVE_EPSILON = 1e-9
"""A candidate must lower the imbalance by more than this fraction to count as a gain."""


@dataclass(frozen=True)
class ReplaceOptions:
    """Tuning of the balance-versus-moves trade-off of `Replace`."""

    min_gain_per_move: float = 0.005
    """Imbalance (max/mean rank load) a layer must gain per slot moved. 0 takes the best balance
    found whatever it moves; 0.005 moves 20 slots only for a gain of at least 0.1 (e.g. 1.30 ->
    1.20)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_gain_per_move) or self.min_gain_per_move < 0:
            raise ValueError(
                f"min_gain_per_move: must be finite and >= 0, got {self.min_gain_per_move}"
            )


def nothing_to_replicate(num_experts: int, world_size: int, slots_per_rank: int) -> bool:
    """True for the seed's layout: one slot per rank and E == R leave no spare slot to use."""
    return slots_per_rank == 1 and num_experts == world_size


def balanced_counts(layer_load: Sequence[float], total_slots: int) -> tuple[int, ...]:
    """Replica counts [E] minimising the max load per replica, from scratch.

    Args:
        layer_load: [E] tokens per expert.
        total_slots: N >= E.
    Returns:
        counts [E], each >= 1, summing to N; ties go to the lower expert id.
    """
    counts = [1] * len(layer_load)
    for _ in range(total_slots - len(layer_load)):
        hottest = max(range(len(counts)), key=lambda e: (layer_load[e] / counts[e], -e))
        counts[hottest] += 1
    return tuple(counts)


def count_path(current: Sequence[int], layer_load: Sequence[float]) -> list[tuple[int, ...]]:
    """Replica counts from `current` towards balance, one replica transferred per step.

    Each step takes a replica from the expert that would have the lowest load per replica after
    losing it and gives it to the expert with the highest load per replica, while that lowers the
    latter's per-replica load below the former's new one (so the sorted per-replica loads
    decrease and the path ends).

    Args:
        current: counts [E], each >= 1.
        layer_load: [E] tokens per expert.
    Returns:
        [current, step 1, step 2, ...], each counts [E] with the same sum.
    """
    counts = list(current)
    path = [tuple(counts)]
    experts = range(len(counts))
    for _ in range(sum(counts) * len(counts)):
        hot = max(experts, key=lambda e: (layer_load[e] / counts[e], -e))
        donors = [e for e in experts if counts[e] > 1 and e != hot]
        if not donors:
            break
        cold = min(donors, key=lambda e: (layer_load[e] / (counts[e] - 1), e))
        if layer_load[cold] / (counts[cold] - 1) >= layer_load[hot] / counts[hot]:
            break
        counts[hot] += 1
        counts[cold] -= 1
        path.append(tuple(counts))
    return path


def pack(
    counts: Sequence[int],
    layer_load: Sequence[float],
    current: LayerSlots,
    cap: float,
) -> tuple[tuple[int, ...], ...]:
    """Place `counts` replicas on the ranks of `current`, keeping current slots under `cap`.

    Args:
        counts: [E] replicas per expert, summing to R * S.
        layer_load: [E] tokens per expert.
        current: [R][S] the layer's current slots.
        cap: max rank load up to which current slots are kept (math.inf keeps all it can).
    Returns:
        slots [R][S]; a kept expert stays in its slot index.
    """
    per_replica = [
        load / count if count else 0.0 for load, count in zip(layer_load, counts, strict=True)
    ]
    remaining = list(counts)
    slots_per_rank = len(current[0])
    new: list[list[int]] = [[-1] * slots_per_rank for _ in current]
    loads = [0.0] * len(current)
    places = [(rank, slot) for rank in range(len(current)) for slot in range(slots_per_rank)]
    places.sort(key=lambda place: -per_replica[current[place[0]][place[1]]])
    for rank, slot in places:
        expert = current[rank][slot]
        if remaining[expert] > 0 and loads[rank] + per_replica[expert] <= cap:
            new[rank][slot] = expert
            remaining[expert] -= 1
            loads[rank] += per_replica[expert]
    rest = [e for e in range(len(counts)) for _ in range(remaining[e])]
    rest.sort(key=lambda e: -per_replica[e])
    for expert in rest:
        rank = min((r for r in range(len(new)) if -1 in new[r]), key=lambda r: (loads[r], r))
        new[rank][new[rank].index(-1)] = expert
        loads[rank] += per_replica[expert]
    return tuple(tuple(rank_slots) for rank_slots in new)


def refine_counts(
    counts: Sequence[int], layer_load: Sequence[float], current: LayerSlots
) -> tuple[int, ...]:
    """Hill-climb replica counts on the max rank load of a fresh packing.

    Minimising the max load per replica (`balanced_counts`) is not the same as minimising the max
    rank load once replicas are packed S to a rank, so try moving one replica from any expert to
    an expert on the most loaded rank, and keep the first move that lowers the max rank load.

    Args:
        counts: [E] starting replica counts.
        layer_load: [E] tokens per expert.
        current: [R][S] (only its shape is used: a fresh packing keeps nothing).
    Returns:
        counts [E], each >= 1, same sum.
    """
    best = tuple(counts)

    def max_load(candidate: Sequence[int]) -> float:
        return max(rank_loads(pack(candidate, layer_load, current, 0.0), layer_load))

    best_load = max_load(best)
    for _ in range(sum(best) * len(best)):
        packed = pack(best, layer_load, current, 0.0)
        loads = rank_loads(packed, layer_load)
        hot_rank = max(range(len(loads)), key=lambda r: (loads[r], -r))
        improved = False
        for receiver in sorted(set(packed[hot_rank])):
            for donor in range(len(best)):
                if donor == receiver or best[donor] < 2:
                    continue
                trial = list(best)
                trial[donor] -= 1
                trial[receiver] += 1
                trial_load = max_load(trial)
                if trial_load < best_load * (1 - _RELATIVE_EPSILON):
                    best, best_load, improved = tuple(trial), trial_load, True
                    break
            if improved:
                break
        if not improved:
            break
    return best


def align(new: LayerSlots, current: LayerSlots) -> tuple[tuple[int, ...], ...]:
    """Renumber the ranks of `new` to keep as many current slots as possible.

    Rank loads do not depend on which rank holds which group of slots, so the groups of `new`
    are matched to current ranks greedily by overlap (most shared experts first, ties to lower
    ids), and inside a rank a kept expert goes back to its current slot index.

    Args:
        new: [R][S] a placement.
        current: [R][S] the current placement.
    Returns:
        slots [R][S] with the same rank loads as `new` and at most as many moved slots.
    """
    holders: dict[int, list[tuple[int, int]]] = {}
    for rank, old in enumerate(current):
        for expert, count in Counter(old).items():
            holders.setdefault(expert, []).append((rank, count))
    overlap: dict[tuple[int, int], int] = {}
    for group, slots in enumerate(new):
        for expert, count in Counter(slots).items():
            for rank, held in holders.get(expert, ()):
                overlap[group, rank] = overlap.get((group, rank), 0) + min(count, held)
    rank_of: dict[int, int] = {}
    taken: set[int] = set()
    for group, rank in sorted(overlap, key=lambda pair: (-overlap[pair], pair)):
        if group not in rank_of and rank not in taken:
            rank_of[group] = rank
            taken.add(rank)
    free = iter(rank for rank in range(len(current)) if rank not in taken)
    for group in range(len(new)):
        if group not in rank_of:
            rank_of[group] = next(free)
    aligned: list[tuple[int, ...]] = [()] * len(current)
    for group, rank in rank_of.items():
        aligned[rank] = _keep_positions(new[group], current[rank])
    return tuple(aligned)


def _keep_positions(group: Sequence[int], old: Sequence[int]) -> tuple[int, ...]:
    """Order `group` [S] so that experts also in `old` [S] sit in their old slot index."""
    left = Counter(group)
    placed: list[int | None] = [None] * len(old)
    for slot, expert in enumerate(old):
        if left[expert] > 0:
            placed[slot] = expert
            left[expert] -= 1
    rest = iter(sorted(left.elements()))
    return tuple(expert if expert is not None else next(rest) for expert in placed)


def _candidates(
    current: LayerSlots, layer_load: Sequence[float]
) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Candidate layer placements [R][S] (see the module docstring), in a fixed order."""
    total_slots = len(current) * len(current[0])
    current_counts = replica_counts(current, len(layer_load))
    count_options = count_path(current_counts, layer_load)
    fresh = balanced_counts(layer_load, total_slots)
    for counts in (fresh, refine_counts(fresh, layer_load, current)):
        if counts not in count_options:
            count_options.append(counts)
    mean = sum(layer_load) / len(current)
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for counts in count_options:
        heaviest = max(load / count for load, count in zip(layer_load, counts, strict=True))
        bound = max(mean, heaviest)
        for factor in _CAP_FACTORS:
            packed = pack(counts, layer_load, current, bound * factor)
            if packed not in seen:
                seen.add(packed)
                yield align(packed, current)


def replace_layer(
    current: LayerSlots, layer_load: Sequence[float], options: ReplaceOptions
) -> tuple[tuple[int, ...], ...]:
    """Rebalance one layer: the cheapest placement by imbalance plus move cost.

    Args:
        current: [R][S] current slots; every expert with load > 0 has one.
        layer_load: [E] tokens per expert over the window.
    Returns:
        slots [R][S]: `current` itself when no candidate is worth its moves; otherwise a placement
        with a strictly lower max rank load.
    """
    current = tuple(tuple(rank_slots) for rank_slots in current)
    before = imbalance(rank_loads(current, layer_load))
    best_key: tuple[float, int, float] = (before, 0, before)
    best = current
    for candidate in _candidates(current, layer_load):
        after = imbalance(rank_loads(candidate, layer_load))
        moved = moved_experts(current, candidate)
        if moved == 0 or after >= before * (1 - _RELATIVE_EPSILON):
            continue
        key = (after + options.min_gain_per_move * moved, moved, after)
        if key < best_key:
            best_key, best = key, candidate
    return best


def replace_slots(
    slots: Sequence[LayerSlots],
    expert_load: Sequence[Sequence[float]],
    options: ReplaceOptions | None = None,
) -> Slots:
    """Rebalance every layer independently with `replace_layer`.

    Args:
        slots: [L][R][S] current placement; every expert has a slot in every layer.
        expert_load: [L][E] tokens per expert over the window.
    Returns:
        slots [L][R][S].
    """
    options = options or ReplaceOptions()
    return tuple(
        replace_layer(layer_slots, layer_load, options)
        for layer_slots, layer_load in zip(slots, expert_load, strict=True)
    )
