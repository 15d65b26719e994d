"""Replace's candidates for every layer, built and scored with numpy (see `planning.replace`).

Four families, in this order (the order decides exact ties):

1. Packings: for each replica-count option (points on the count path, the balanced counts,
   refined where the budget allows) and each load cap, keep current slots under the cap and
   fill the rest by LPT (`packing.pack`). Fresh packings (cap 0) are aligned to the current
   ranks (`align.align`); where the budget allows, every packing is (the reference's set).
2. Swap descents (`repair.swap_descent`) from the current layer, from the current slots kept
   under the path's end counts and under the balanced counts, and from the fresh packing of
   the balanced counts (EPLB's placement): the placements after 1, 2, 4, ... swaps.
3. With pods: those three packings again with each expert's replicas kept within its quota per
   pod (`pods.Spread`), and swap descents from the current layer and from them that keep the
   quotas. So with pods every candidate of the flat planner is a candidate too.
4. Where the layers grow: the other fill of the new slots (`replace.Grown.kept`, the current
   layer is `Grown.hot`), and a swap descent from it.

Work budget: the reference's set (all path points, 14 caps, refinement, all aligned) where
layers x points x caps x N x R fits `WORK_BUDGET`; at DeepSeek scale a sample of the path and
4 caps (the swap descents carry the quality there). Memory: packings go in chunks of layers.

Legend: L layers, C candidates per layer, K count options, R ranks, S slots per rank, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe_operator.planning import arrays, packing, repair
from moe_operator.planning.align import align

CAP_FACTORS = (0.0, 1.0, 1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, math.inf)
"""Load caps for keeping current slots, as multiples of the layer's lower bound (0: keep
nothing, a fresh LPT packing; inf: keep all that the counts allow)."""
SCALE_CAP_FACTORS = (0.0, 1.02, 1.1, math.inf)
"""The caps tried where the full set does not fit the work budget."""
SCALE_PATH_POINTS = 4
"""Points of each layer's count path tried where the whole path does not fit the budget."""
WORK_BUDGET = 2e7
"""Packing work (layers x counts x caps x N x R) up to which the full set is tried."""
REFINE_BUDGET = 5e6
"""Work of one refinement round (layers x S x E x N x R) up to which counts are hill-climbed."""
CHUNK_ROWS = 4096
"""Candidate layers packed at once: bounds memory (a few arrays of rows x N entries)."""
SCORE_ENTRIES = 1 << 20
"""Slots of candidates scored at once (a few arrays of this many entries)."""


@dataclass(frozen=True)
class Scored:
    """Every candidate of every layer with its score (balance and moves; cross-pod on demand)."""

    current: np.ndarray  # slots_LRS
    load: np.ndarray  # load_LE
    pods: int | None  # ranks per pod (None: flat)
    slots: np.ndarray  # slots_LCRS
    after: np.ndarray  # imbalance_LC
    moved: np.ndarray  # moved_LC

    def cross(self, wanted_LC: np.ndarray) -> np.ndarray:
        """cross-pod fraction_LC of the `wanted` candidates (NaN elsewhere, and without pods)."""
        out = np.full(wanted_LC.shape, np.nan)
        layer, index = np.nonzero(wanted_LC)
        if len(layer):
            out[layer, index] = arrays.cross_pod_fraction(
                self.slots[layer, index], self.load[layer], self.pods
            )
        return out


def build(
    current: np.ndarray, load: np.ndarray, pods: int | None, also: np.ndarray | None = None
) -> Scored:
    """All candidates of every layer (see the module), scored; `also` (slots_LTRS, the same
    experts on every rank as `current`) are candidates too, and swap descents start from them."""
    layers, ranks, per_rank = current.shape
    counts, path_points, caps, full = _count_options_and_caps(current, load)
    packed = _packings(current, load, counts, caps, full)
    grid = packed.reshape(layers, counts.shape[1], len(caps), ranks, per_rank)
    keep_all, fresh = len(caps) - 1, 0
    starts = [grid[:, path_points - 1, keep_all], grid[:, -1, keep_all], grid[:, -1, fresh]]
    found = [packed, _descents(np.stack([current, *starts], axis=1), load, None)]
    if also is not None:
        found += [also, _descents(also, load, None)]
    if pods is not None:
        spread = _spread_starts(current, load, counts[:, [path_points - 1, -1]], pods)
        found += [
            spread,
            _descents(np.stack([current, *spread.transpose(1, 0, 2, 3)], axis=1), load, pods),
        ]
    slots = np.concatenate(found, axis=1).astype(np.int32)  # experts < 2**31; half the memory
    return _score(current, load, pods, slots)


def _spread_starts(
    current: np.ndarray, load: np.ndarray, counts_L2E: np.ndarray, pods: int
) -> np.ndarray:
    """slots_L3RS packed with the pods variant: the current slots kept under the path's end
    counts and under the balanced counts, and a fresh packing of the latter (aligned)."""
    layers = len(current)
    keep_all, fresh = np.full(layers, np.inf), np.zeros(layers)
    path_end, balanced = counts_L2E[:, 0], counts_L2E[:, 1]
    packed = [
        packing.pack(path_end, load, current, keep_all, pods),
        packing.pack(balanced, load, current, keep_all, pods),
        align(packing.pack(balanced, load, current, fresh, pods), current, load.shape[1]),
    ]
    return np.stack(packed, axis=1)


def _score(current: np.ndarray, load: np.ndarray, pods: int | None, slots: np.ndarray) -> Scored:
    """Imbalance and moves of every candidate, a chunk of layers at a time (bounded memory)."""
    layers, per_layer, ranks, per_rank = slots.shape
    after = np.empty((layers, per_layer))
    moved = np.empty((layers, per_layer), dtype=np.int64)
    chunk = max(1, SCORE_ENTRIES // (per_layer * ranks * per_rank))
    for start in range(0, layers, chunk):
        part = slice(start, min(layers, start + chunk))
        count = len(range(*part.indices(layers)))
        flat = slots[part].reshape(count * per_layer, ranks, per_rank)
        load_rows = np.repeat(load[part], per_layer, axis=0)
        current_rows = np.repeat(current[part], per_layer, axis=0)
        after[part] = arrays.imbalances(arrays.rank_loads(flat, load_rows)).reshape(count, -1)
        moved[part] = arrays.moved_experts(current_rows, flat).reshape(count, -1)
    return Scored(current, load, pods, slots, after, moved)


def _count_options_and_caps(
    current: np.ndarray, load: np.ndarray
) -> tuple[np.ndarray, int, tuple[float, ...], bool]:
    """(counts_LKE: path points, balanced, [refined]; how many path points; cap factors;
    whether the full set)."""
    layers, ranks, per_rank = current.shape
    experts = load.shape[1]
    slots = ranks * per_rank
    now = arrays.replica_counts(current, experts)
    full_points = int(WORK_BUDGET // (layers * slots * ranks * len(CAP_FACTORS))) - 2
    path, full = packing.count_path(now, load, full_points, SCALE_PATH_POINTS)
    fresh = packing.balanced_counts(load, slots)
    options = [path, fresh[:, None, :]]
    if full and layers * per_rank * experts * slots * ranks <= REFINE_BUDGET:
        options.append(packing.refine_counts(fresh, load, current)[:, None, :])
    caps = CAP_FACTORS if full else SCALE_CAP_FACTORS
    return np.concatenate(options, axis=1), path.shape[1], caps, full


def _packings(
    current: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    caps: tuple[float, ...],
    align_all: bool,
) -> np.ndarray:
    """slots_LCRS of every (count option, cap), in that order, in chunks of layers."""
    layers, ranks, per_rank = current.shape
    per_layer = counts.shape[1] * len(caps)
    chunk = max(1, CHUNK_ROWS // per_layer)
    packed = np.empty((layers, per_layer, ranks, per_rank), dtype=np.int64)
    for start in range(0, layers, chunk):
        part = slice(start, min(layers, start + chunk))
        packed[part] = _pack_chunk(current[part], load[part], counts[part], caps, align_all)
    return packed


def _pack_chunk(
    current: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    caps: tuple[float, ...],
    align_all: bool,
) -> np.ndarray:
    layers, options, experts = counts.shape
    _, ranks, per_rank = current.shape
    factors = np.asarray(caps)
    weights = arrays.per_replica(load[:, None, :], counts)  # [l, K, E]
    mean = np.cumsum(load, axis=1)[:, -1] / ranks
    bound = np.maximum(mean[:, None], weights.max(axis=2))  # [l, K]
    with np.errstate(invalid="ignore"):  # 0 x inf is NaN: keeps nothing, as in the reference
        cap = np.where(factors == 0, 0.0, bound[:, :, None] * factors)  # [l, K, C]
    shape = (layers, options, len(caps))
    total = math.prod(shape)
    flat_counts = np.broadcast_to(counts[:, :, None, :], (*shape, experts)).reshape(total, -1)
    flat_load = np.broadcast_to(load[:, None, None, :], (*shape, experts)).reshape(total, -1)
    flat_current = np.broadcast_to(current[:, None, None], (*shape, ranks, per_rank))
    flat_current = flat_current.reshape(total, ranks, per_rank)
    packed = packing.pack(flat_counts, flat_load, flat_current, cap.reshape(total))
    fresh = np.broadcast_to(factors == 0, shape).reshape(total)
    to_align = np.ones(total, dtype=bool) if align_all else fresh
    packed[to_align] = align(packed[to_align], flat_current[to_align], experts)
    return packed.reshape(layers, options * len(caps), ranks, per_rank)


def _descents(starts_LTRS: np.ndarray, load: np.ndarray, ranks_per_pod: int | None) -> np.ndarray:
    """slots_LCRS: the checkpoints of a swap descent from each start (T starts per layer)."""
    layers, count, ranks, per_rank = starts_LTRS.shape
    start = starts_LTRS.reshape(layers * count, ranks, per_rank)
    rows_load = np.repeat(load, count, axis=0)
    kept, _ = repair.swap_descent(start, rows_load, 2 * ranks, ranks_per_pod)
    return kept.reshape(layers, -1, ranks, per_rank)
