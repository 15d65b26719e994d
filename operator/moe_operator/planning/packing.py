"""Replica counts and packings of many candidate layers at once (numpy), for `planning.replace`.

Each function is the vectorised form of its namesake in `planning.reference`, with the same
tie-breaking, so that on the same inputs both give the same counts and the same slots. The loops
left run over slots or experts (hundreds), never over layers or candidates (thousands).

Legend: L = layers, B = candidate rows, R = ranks, S = slots per rank, E = logical experts,
N = R * S slots per layer, P = pods.
"""

from __future__ import annotations

import numpy as np

from moe_operator.planning.arrays import RELATIVE_EPSILON, per_replica, rank_loads, rows
from moe_operator.planning.pods import Spread


def balanced_counts(load_LE: np.ndarray, total_slots: int) -> np.ndarray:
    """counts_LE minimising the max load per replica: one replica each, then every spare slot
    to the expert with the highest load per replica (ties to the lower id)."""
    layers, experts = load_LE.shape
    counts = np.ones((layers, experts), dtype=np.int64)
    every = rows(layers)
    for _ in range(total_slots - experts):
        hottest = np.argmax(load_LE / counts, axis=1)
        counts[every, hottest] += 1
    return counts


def count_path(
    current_LE: np.ndarray, load_LE: np.ndarray, max_points: int, sample_points: int
) -> tuple[np.ndarray, bool]:
    """Replica counts from the current ones towards balance, one replica transferred per step
    (from the expert with the lowest load per replica after losing one to the one with the
    highest, while that lowers the latter below the former).

    Args:
        current_LE: counts now, each >= 1.
        max_points: every point of every path is returned where the longest has at most this
            many; otherwise `sample_points` of each, spread from its start to its end
            (geometrically: the first steps move least).
    Returns:
        (path_LKE, whole): K points per layer in path order (a shorter path repeats its last
        point), and whether they are every point.
    """
    layers, experts = current_LE.shape
    counts = current_LE.astype(np.int64).copy()
    every, ids = rows(layers), np.arange(experts)
    active = np.ones(layers, dtype=bool)
    hot_steps: list[np.ndarray] = []
    cold_steps: list[np.ndarray] = []
    for _ in range(int(counts.sum(axis=1).max()) * experts):
        per = load_LE / counts
        hot = np.argmax(per, axis=1)
        donor = (counts > 1) & (ids[None, :] != hot[:, None])
        after_loss = np.where(donor, load_LE / np.maximum(counts - 1, 1), np.inf)
        cold = np.argmin(after_loss, axis=1)
        step = active & donor.any(axis=1)
        step &= after_loss[every, cold] < per[every, hot]
        if not step.any():
            break
        counts[every[step], hot[step]] += 1
        counts[every[step], cold[step]] -= 1
        hot_steps.append(np.where(step, hot, -1))
        cold_steps.append(cold)
        active = step
    steps = np.array([(h >= 0) for h in hot_steps]).sum(axis=0) if hot_steps else None
    steps_L = np.zeros(layers, dtype=np.int64) if steps is None else steps.astype(np.int64)
    whole = int(steps_L.max(initial=0)) + 1 <= max_points
    chosen = _path_points(steps_L, None if whole else sample_points)
    path = np.empty((layers, chosen.shape[1], experts), dtype=np.int64)
    replay = current_LE.astype(np.int64).copy()
    for index in range(len(hot_steps) + 1):
        here = chosen == index
        if here.any():
            layer, point = np.nonzero(here)
            path[layer, point] = replay[layer]
        if index < len(hot_steps):
            moving = hot_steps[index] >= 0
            replay[every[moving], hot_steps[index][moving]] += 1
            replay[every[moving], cold_steps[index][moving]] -= 1
    return path, whole


def _path_points(steps_L: np.ndarray, points: int | None) -> np.ndarray:
    """Step indices [L, K] of the path points to keep, in path order, a layer's last repeated."""
    longest = int(steps_L.max()) + 1 if steps_L.size else 1
    if points is None or longest <= points:
        grid = np.arange(longest)[None, :]
        return np.minimum(grid, steps_L[:, None])
    # 0, 1, then geometric fractions of each layer's path, then its end
    fractions = np.concatenate([[0.0], np.geomspace(1 / 64, 1.0, points - 1)])
    chosen = np.round(fractions[None, :] * steps_L[:, None]).astype(np.int64)
    chosen[:, 1] = np.minimum(1, steps_L)
    return np.maximum.accumulate(chosen, axis=1)


def pack(
    counts_BE: np.ndarray,
    load_BE: np.ndarray,
    current_BRS: np.ndarray,
    cap_B: np.ndarray,
    ranks_per_pod: int | None = None,
) -> np.ndarray:
    """Place `counts` replicas on the ranks of `current`, keeping current slots under `cap`.

    Keep: current slots, heaviest replica first (ties in rank-then-slot order), while the expert
    still needs a replica and the rank stays within the cap. Fill: the remaining replicas,
    heaviest first (ties to the lower expert id), each on the least-loaded rank with a free slot
    (ties to the lower rank) into its first free slot. With `ranks_per_pod` both keep an
    expert's replicas within its quota per pod (`pods.Spread`); the fill goes elsewhere only
    where no pod with room for the expert has a free slot.

    Returns:
        slots_BRS; a kept expert stays in its slot index.
    """
    b, r, s = current_BRS.shape
    every = rows(b)
    weights = per_replica(load_BE, counts_BE)
    current = current_BRS.reshape(b, r * s)
    new = np.full((b, r * s), -1, dtype=np.int64)
    loads = np.zeros((b, r))
    remaining = counts_BE.astype(np.int64).copy()
    place_weight = np.take_along_axis(weights, current, axis=1)
    order = np.argsort(-place_weight, axis=1, kind="stable")
    spread = None
    if ranks_per_pod is not None and ranks_per_pod < r:
        spread = Spread(counts_BE, r, ranks_per_pod)
    for index in range(r * s):
        place = order[:, index]
        expert = current[every, place]
        rank = place // s
        weight = weights[every, expert]
        keep = remaining[every, expert] > 0
        keep &= loads[every, rank] + weight <= cap_B
        if spread is not None:
            keep &= spread.room(every, expert, rank)
            spread.add(every[keep], expert[keep], rank[keep])
        kept = every[keep]
        new[kept, place[keep]] = expert[keep]
        remaining[kept, expert[keep]] -= 1
        loads[kept, rank[keep]] += weight[keep]
    _fill(new.reshape(b, r, s), loads, remaining, weights, spread)
    return new.reshape(b, r, s)


def _fill(
    new_BRS: np.ndarray,
    loads_BR: np.ndarray,
    remaining_BE: np.ndarray,
    weights_BE: np.ndarray,
    spread: Spread | None,
) -> None:
    """The fill step of `pack`, in place: LPT of the replicas `remaining` still asks for.

    Rows are taken in order of how many replicas they still place (most first), so that each
    step works on the rows still placing: a prefix, as short as the step is late."""
    items = _items_heaviest_first(remaining_BE, weights_BE)
    order = np.argsort(-(items >= 0).sum(axis=1), kind="stable")
    still = (items[order] >= 0).sum(axis=0)  # rows placing at each step, a prefix of `order`
    new, loads, items = new_BRS[order], loads_BR[order], items[order]
    weights = weights_BE[order]
    free = (new < 0).sum(axis=2)
    if spread is not None:
        spread.reorder(order)
    for index in range(items.shape[1]):
        live = int(still[index])
        go = rows(live)
        expert = items[:live, index]
        open_ranks = free[:live] > 0
        if spread is not None:
            roomy = open_ranks & spread.room_by_rank(go, expert)
            open_ranks = np.where(roomy.any(axis=1)[:, None], roomy, open_ranks)
        rank = np.argmin(np.where(open_ranks, loads[:live], np.inf), axis=1)
        slot = np.argmax(new[go, rank] < 0, axis=1)
        new[go, rank, slot] = expert
        loads[go, rank] += weights[go, expert]
        free[go, rank] -= 1
        if spread is not None:
            spread.add(go, expert, rank)
    new_BRS[order], loads_BR[order] = new, loads


def _items_heaviest_first(remaining_BE: np.ndarray, weights_BE: np.ndarray) -> np.ndarray:
    """items_BM: per row, each expert repeated by its remaining replicas, heaviest first (ties to
    the lower id), padded with -1."""
    b = remaining_BE.shape[0]
    order = np.argsort(-weights_BE, axis=1, kind="stable")
    repeats = np.take_along_axis(remaining_BE, order, axis=1)
    per_row = repeats.sum(axis=1)
    width = int(per_row.max()) if b else 0
    items = np.full((b, width), -1, dtype=np.int64)
    if width == 0:
        return items
    flat = np.repeat(order.ravel(), repeats.ravel())
    row = np.repeat(rows(b), per_row)
    start = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    items[row, np.arange(flat.size) - start[row]] = flat
    return items


def max_rank_load(
    counts_BE: np.ndarray, load_BE: np.ndarray, current_BRS: np.ndarray
) -> np.ndarray:
    """max_B: the max rank load of a fresh packing (cap 0) of `counts`, flat model."""
    packed = pack(counts_BE, load_BE, current_BRS, np.zeros(len(counts_BE)))
    return rank_loads(packed, load_BE).max(axis=1)


def refine_counts(
    counts_LE: np.ndarray, load_LE: np.ndarray, current_LRS: np.ndarray
) -> np.ndarray:
    """Hill-climb replica counts on the max rank load of a fresh packing, every layer at once.

    Per layer and round: pack fresh, and try moving one replica from any expert (donor, with 2 or
    more) to an expert of the most loaded rank (receiver); take the first trial, receivers in id
    order then donors in id order, that lowers the max rank load; stop when none does.
    """
    layers, experts = counts_LE.shape
    slots = current_LRS.shape[1] * current_LRS.shape[2]
    best = counts_LE.astype(np.int64).copy()
    best_load = max_rank_load(best, load_LE, current_LRS)
    active = np.ones(layers, dtype=bool)
    for _ in range(slots * experts):
        if not active.any():
            break
        live = np.nonzero(active)[0]
        packed = pack(best[live], load_LE[live], current_LRS[live], np.zeros(len(live)))
        loads = rank_loads(packed, load_LE[live])
        hot = packed[rows(len(live)), np.argmax(loads, axis=1)]  # [l, S]
        receivers = _sorted_unique(hot)  # [l, S], -1 padded
        donor = np.arange(experts)[None, None, :]
        valid = (receivers[:, :, None] >= 0) & (donor != receivers[:, :, None])
        valid &= best[live][:, None, :] >= 2
        layer_i, receiver_i, donor_i = np.nonzero(valid)
        trial = best[live][layer_i]
        trial[rows(len(layer_i)), donor_i] -= 1
        trial[rows(len(layer_i)), receivers[layer_i, receiver_i]] += 1
        trial_load = np.full(valid.shape, np.inf)
        if len(layer_i):
            chosen = live[layer_i]
            trial_load[layer_i, receiver_i, donor_i] = max_rank_load(
                trial, load_LE[chosen], current_LRS[chosen]
            )
        better = trial_load < best_load[live][:, None, None] * (1 - RELATIVE_EPSILON)
        flat = better.reshape(len(live), -1)
        improved = flat.any(axis=1)
        first = np.argmax(flat, axis=1)
        receiver_at, donor_at = np.divmod(first, experts)
        for index in np.nonzero(improved)[0]:
            layer = live[index]
            best[layer, donor_at[index]] -= 1
            best[layer, receivers[index, receiver_at[index]]] += 1
            best_load[layer] = trial_load[index, receiver_at[index], donor_at[index]]
        active[live[~improved]] = False
    return best


def _sorted_unique(values_BS: np.ndarray) -> np.ndarray:
    """Per row, the distinct values ascending, padded with -1 at the end."""
    ordered = np.sort(values_BS, axis=1)
    repeat = np.zeros(ordered.shape, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    big = np.iinfo(np.int64).max
    unique = np.sort(np.where(repeat, big, ordered), axis=1)
    return np.where(unique == big, -1, unique)
