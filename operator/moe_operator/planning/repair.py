"""Repair by swaps: lower a layer's max rank load a few moves at a time (numpy, all layers at once).

After a drift most experts sit where they should; a fresh packing would move nearly every slot to
fix a few overloaded ranks. A swap exchanges one slot of the most loaded rank with one slot of
another rank (at most two experts move, the replica counts stay), chosen to bring the pair's
larger load lowest; the descent stops where no swap lowers the most loaded rank. The placements
after 1, 2, 4, ... swaps are candidates for `planning.replace`, whose cost rule picks how far to
go: the path from the current placement to a balanced one in moves actually needed.

Legend: B = rows (layers or candidates), R ranks, S slots per rank, E experts, K checkpoints.
"""

from __future__ import annotations

import numpy as np

from moe_operator.planning.arrays import RELATIVE_EPSILON, per_replica, replica_counts, rows
from moe_operator.planning.pods import Spread

CHECKPOINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Swap counts after which the placement is kept as a candidate (and after the last swap)."""
PARTNERS = 16
"""A hot rank swaps with one of this many least-loaded ranks (all ranks where fewer)..."""
PAIRS_PER_ROW = 1024
"""... and fewer where many slots per rank would make more slot pairs than this to weigh."""


def swap_descent(
    start_BRS: np.ndarray, load_BE: np.ndarray, max_swaps: int, ranks_per_pod: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Placements along the descent of each row (see the module).

    Args:
        start_BRS: where each row's descent starts.
        load_BE: tokens per expert of each row's layer.
        max_swaps: at most this many swaps per row.
        ranks_per_pod: with pods, a swap across pods must keep both experts within their quota
            per pod (`pods.Spread`).
    Returns:
        (slots_BKRS, swaps_BK): the placement at each checkpoint (and at the end: a row that
        stopped early repeats its last), and the swaps it took.
    """
    b, r, s = start_BRS.shape
    slots = start_BRS.copy()
    counts = replica_counts(slots, load_BE.shape[1])
    weights = per_replica(load_BE, counts)
    spread = None
    if ranks_per_pod is not None and ranks_per_pod < r:
        spread = Spread.of(slots, counts, ranks_per_pod)
    every = rows(b)
    slot_w = np.take_along_axis(weights, slots.reshape(b, -1), axis=1).reshape(b, r, s)
    loads = slot_w.sum(axis=2)
    marks = [c for c in CHECKPOINTS if c < max_swaps] + [max_swaps]
    kept = np.empty((b, len(marks), r, s), dtype=slots.dtype)
    taken = np.zeros((b, len(marks)), dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    swaps = np.zeros(b, dtype=np.int64)
    mark = 0
    for step in range(1, max_swaps + 1):
        live = every[~done]
        if live.size:
            found = _best_swaps(live, slots[live], slot_w[live], loads[live], spread)
            moving, hot, slot_h, rank_j, slot_j = found
            _apply(slots, slot_w, loads, live[moving], (hot, slot_h, rank_j, slot_j), spread)
            swaps[live[moving]] += 1
            done[live[~moving]] = True
        if step == marks[mark]:
            kept[:, mark], taken[:, mark] = slots, swaps
            mark += 1
            if mark == len(marks):
                break
        if done.all():
            kept[:, mark:], taken[:, mark:] = slots[:, None], swaps[:, None]
            break
    return kept, taken


def _best_swaps(
    live: np.ndarray,
    slots: np.ndarray,
    slot_w: np.ndarray,
    loads: np.ndarray,
    spread: Spread | None,
) -> tuple[np.ndarray, ...]:
    """Per row, the swap of a slot of the most loaded rank with a slot of one of the
    `PARTNERS` least loaded ranks that brings the larger of the two new loads lowest; `moving`
    where it lowers the hot rank. Returns (moving, hot, hot slot, partner rank, partner slot)."""
    b, r, s = slot_w.shape
    every = rows(b)
    hot = np.argmax(loads, axis=1)
    top = loads[every, hot]
    partners = min(PARTNERS, r, max(2, PAIRS_PER_ROW // (s * s)))
    cool = np.argpartition(loads, partners - 1, axis=1)[:, :partners] if partners < r else None
    if cool is None:
        cool = np.broadcast_to(np.arange(r), (b, r))
    w_hot = slot_w[every, hot]  # [b, S]
    w_cool = slot_w[every[:, None], cool]  # [b, k, S]
    gain = w_hot[:, :, None, None] - w_cool[:, None, :, :]  # [b, S, k, S]: hot sheds this much
    hot_after = top[:, None, None, None] - gain
    cool_after = loads[every[:, None], cool][:, None, :, None] + gain
    worst = np.maximum(hot_after, cool_after)
    allowed = (gain > 0) & (cool != hot[:, None])[:, None, :, None]
    if spread is not None:
        allowed &= _within_quota(spread, live, slots, hot, cool)
    worst = np.where(allowed, worst, np.inf).reshape(b, -1)
    pick = np.argmin(worst, axis=1)
    value = worst[every, pick]
    slot_h, partner, slot_j = np.unravel_index(pick, (s, partners, s))
    rank_j = cool[every, partner]
    moving = value < top * (1 - RELATIVE_EPSILON)
    return moving, hot[moving], slot_h[moving], rank_j[moving], slot_j[moving]


def _within_quota(
    spread: Spread, live: np.ndarray, slots: np.ndarray, hot: np.ndarray, cool: np.ndarray
) -> np.ndarray:
    """[b, S, k, S]: whether swapping hot slot i with slot j of cool rank k keeps both experts
    within their quota per pod (always, inside one pod)."""
    b = len(live)
    every = rows(b)
    row = live[:, None, None]
    hot_experts = slots[every, hot]  # [b, S]
    cool_experts = slots[every[:, None], cool]  # [b, k, S]
    # the cool slot's expert into the hot rank's pod; the hot slot's expert into the cool pod's
    into_hot = spread.room(row, cool_experts, hot[:, None, None])  # [b, k, S]
    into_cool = spread.room(row, hot_experts[:, :, None], cool[:, None, :])  # [b, S, k]
    same = spread.pod_of_rank[cool] == spread.pod_of_rank[hot][:, None]  # [b, k]
    both = into_hot[:, None, :, :] & into_cool[:, :, :, None]
    return both | same[:, None, :, None]


def _apply(
    slots: np.ndarray,
    slot_w: np.ndarray,
    loads: np.ndarray,
    which: np.ndarray,
    swap: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    spread: Spread | None,
) -> None:
    """Swap the chosen slots in place, loads and spread updated."""
    hot, slot_h, rank_j, slot_j = swap
    expert_h, expert_j = slots[which, hot, slot_h], slots[which, rank_j, slot_j]
    w_h, w_j = slot_w[which, hot, slot_h], slot_w[which, rank_j, slot_j]
    slots[which, hot, slot_h], slots[which, rank_j, slot_j] = expert_j, expert_h
    slot_w[which, hot, slot_h], slot_w[which, rank_j, slot_j] = w_j, w_h
    loads[which, hot] += w_j - w_h
    loads[which, rank_j] += w_h - w_j
    if spread is not None:
        spread.add(which, expert_h, hot, -1)
        spread.add(which, expert_j, rank_j, -1)
        spread.add(which, expert_j, hot)
        spread.add(which, expert_h, rank_j)
