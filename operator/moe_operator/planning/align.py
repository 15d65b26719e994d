"""Renumber the ranks of candidate packings to keep as many current slots as possible (numpy).

Rank loads do not depend on which rank holds which group of slots, moves do: each group of a
packing goes to the current rank it shares most experts with (greedily, most shared first, ties
to lower group then rank ids), and inside a rank a kept expert goes back to its slot index. The
vectorised form of `planning.reference.align`, with the same result.

Legend: B = candidate rows, R = ranks (groups), S = slots per rank, E = logical experts.
"""

from __future__ import annotations

import numpy as np

from moe_operator.planning.arrays import rows

CHUNK_ELEMENTS = 4_000_000
"""Rows are aligned in chunks whose overlap work array holds at most this many entries."""


def align(new_BRS: np.ndarray, current_BRS: np.ndarray, num_experts: int) -> np.ndarray:
    """slots_BRS: `new` with ranks renumbered and slots reordered (see the module)."""
    b, r, s = new_BRS.shape
    out = np.empty_like(new_BRS)
    chunk = max(1, CHUNK_ELEMENTS // (r * max(s, r)))
    for start in range(0, b, chunk):
        part = slice(start, min(b, start + chunk))
        out[part] = _align_chunk(new_BRS[part], current_BRS[part], num_experts)
    return out


def _align_chunk(new_BRS: np.ndarray, current_BRS: np.ndarray, num_experts: int) -> np.ndarray:
    b = new_BRS.shape[0]
    rank_of = _match(_overlap(new_BRS, current_BRS, num_experts))
    aligned = np.empty_like(new_BRS)
    aligned[rows(b)[:, None], rank_of] = new_BRS
    return keep_positions(aligned, current_BRS)


def _holders(current_BRS: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank_BEM, times_BEM): the distinct ranks holding each expert now (-1 padded) and how
    many of their slots hold it."""
    b, r, _s = current_BRS.shape
    key = np.sort((current_BRS * r + np.arange(r)[None, :, None]).reshape(b, -1), axis=1)
    first = np.ones(key.shape, dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    row, at = np.nonzero(first)
    ends = np.append(at[1:], 0)
    ends[np.append(row[1:] != row[:-1], True)] = key.shape[1]
    times = ends - at  # slots of this (expert, rank) pair
    expert, rank = np.divmod(key[row, at], r)
    pair = np.arange(len(row))
    opens = np.ones(len(row), dtype=bool)
    opens[1:] = (row[1:] != row[:-1]) | (expert[1:] != expert[:-1])
    index = pair - np.maximum.accumulate(np.where(opens, pair, 0))  # holder number of expert
    width = int(index.max(initial=0)) + 1
    ranks = np.full((b, num_experts, width), -1, dtype=np.int64)
    counts = np.zeros((b, num_experts, width), dtype=np.int64)
    ranks[row, expert, index] = rank
    counts[row, expert, index] = times
    return ranks, counts


def _overlap(new_BRS: np.ndarray, current_BRS: np.ndarray, num_experts: int) -> np.ndarray:
    """overlap_BGR: experts group g of `new` shares with current rank r (multiset minimum)."""
    b, r, s = new_BRS.shape
    holder_rank, holder_times = _holders(current_BRS, num_experts)
    first = np.ones(new_BRS.shape, dtype=bool)
    times = np.zeros(new_BRS.shape, dtype=np.int64)
    for k in range(s):
        same = new_BRS == new_BRS[:, :, k : k + 1]
        first[:, :, k] = ~same[:, :, :k].any(axis=2)
        times[:, :, k] = same.sum(axis=2)
    row = rows(b)[:, None, None]
    rank = holder_rank[row, new_BRS]  # [B, G, S, M]
    shared = np.minimum(holder_times[row, new_BRS], times[..., None]) * first[..., None]
    group = np.arange(r)[None, :, None, None]
    index = (rows(b)[:, None, None, None] * r + group) * r + rank
    keep = (rank >= 0) & (shared > 0)
    total = np.bincount(index[keep], weights=shared[keep], minlength=b * r * r)
    return total.reshape(b, r, r).astype(np.int64)


def _match(overlap_BGR: np.ndarray) -> np.ndarray:
    """rank_of_BG: greedy matching by overlap (see the module), the rest in id order."""
    b, r, _ = overlap_BGR.shape
    every = rows(b)
    rank_of = np.full((b, r), -1, dtype=np.int64)
    taken = np.zeros((b, r), dtype=bool)
    for level in range(int(overlap_BGR.max(initial=0)), 0, -1):
        at_level = overlap_BGR == level
        for group in range(r):
            open_ = at_level[:, group] & ~taken & (rank_of[:, group] < 0)[:, None]
            found = open_.any(axis=1)
            rank = np.argmax(open_, axis=1)
            rank_of[found, group] = rank[found]
            taken[every[found], rank[found]] = True
    # unmatched groups, in order, take the free ranks, in order
    ids = np.arange(r)[None, :]
    groups = np.argsort(np.where(rank_of < 0, ids, r + ids), axis=1, kind="stable")
    free = np.argsort(np.where(taken, r + ids, ids), axis=1, kind="stable")
    unmatched = (rank_of < 0).sum(axis=1)
    fill = ids < unmatched[:, None]
    row = np.broadcast_to(every[:, None], (b, r))
    rank_of[row[fill], groups[fill]] = free[fill]
    return rank_of


def keep_positions(new_BRS: np.ndarray, current_BRS: np.ndarray) -> np.ndarray:
    """Each rank's group reordered so that experts also in the rank's current slots sit in
    their current slot index; the others, ascending, fill the remaining slots in order."""
    _b, _r, s = new_BRS.shape
    unused = np.ones(new_BRS.shape, dtype=bool)
    placed = np.full(new_BRS.shape, -1, dtype=np.int64)
    for k in range(s):
        wanted = current_BRS[:, :, k : k + 1]
        match = (new_BRS == wanted) & unused
        found = match.any(axis=2)
        index = np.argmax(match, axis=2)
        placed[:, :, k] = np.where(found, current_BRS[:, :, k], -1)
        bb, rr = np.nonzero(found)
        unused[bb, rr, index[found]] = False
    big = np.iinfo(np.int64).max
    rest = np.sort(np.where(unused, new_BRS, big), axis=2)
    ids = np.arange(s)[None, None, :]
    holes = np.argsort(np.where(placed < 0, ids, s + ids), axis=2, kind="stable")
    count = (placed < 0).sum(axis=2)
    fill = ids < count[..., None]
    bb, rr, kk = np.nonzero(fill)
    placed[bb, rr, holes[bb, rr, kk]] = rest[bb, rr, kk]
    return placed
