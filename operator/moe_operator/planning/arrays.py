"""The load model of `placement`, over numpy arrays of many candidate layers at once.

The vectorised planner (`planning.replace`) scores every candidate of every layer in one call.
Sums run slot by slot and rank by rank, in the order `placement` adds them, so both modules give
the same numbers to the last bit and the reference tests can compare plans exactly.

Legend: B = candidate layers (rows), R = ranks, S = slots per rank, E = logical experts,
P = pods (R / ranks per pod), N = R * S slots per layer.

    slots_BRS[b, r, k]   logical expert in slot k of rank r of row b
    load_BE[b, e]        tokens of expert e in row b's layer over the window

Pods: with the plan's `ranksPerPod` the worker routes by pod (`moe_contract.plan.pod_routes`):
every rank is taken to send each expert the same share of its tokens, so pod p sends load_e / P
of expert e, and its n_p replicas must carry n_p / c of it (c replicas in all) for every replica
to carry load_e / c, as in the flat model. A pod keeps its tokens at home up to that share, and
sends only the rest to pods whose replicas need more: so balance is the flat model's for every
placement, and the fraction of expert e's tokens that leave their pod is
sum_p max(0, 1 / P - n_p / c): (P - 1) / P for a single replica, (P - c) / P for c replicas in
distinct pods, the least c replicas allow.
"""

from __future__ import annotations

import numpy as np

RELATIVE_EPSILON = 1e-9
"""A candidate must lower the imbalance by more than this fraction to count as a gain."""


def rows(count: int) -> np.ndarray:
    return np.arange(count)


def replica_counts(slots_BRS: np.ndarray, num_experts: int) -> np.ndarray:
    """counts_BE: slots holding each expert, per row."""
    b = slots_BRS.shape[0]
    flat = slots_BRS.reshape(b, -1) + (rows(b) * num_experts)[:, None]
    return np.bincount(flat.ravel(), minlength=b * num_experts).reshape(b, num_experts)


def per_replica(load_BE: np.ndarray, counts_BE: np.ndarray) -> np.ndarray:
    """weights_BE: tokens each replica of an expert carries (0 for an expert without a slot)."""
    safe = np.maximum(counts_BE, 1)
    return np.where(counts_BE > 0, load_BE / safe, 0.0)


def _sum_slots(weights_BRS: np.ndarray) -> np.ndarray:
    """Rank loads [B, R]: slot by slot, as `placement.rank_loads` adds them."""
    total = np.zeros(weights_BRS.shape[:2])
    for slot in range(weights_BRS.shape[2]):
        total = total + weights_BRS[:, :, slot]
    return total


def _pod_counts(slots_BRS: np.ndarray, num_experts: int, ranks_per_pod: int) -> np.ndarray:
    """n_BEP: replicas of each expert in each pod."""
    b, r, _s = slots_BRS.shape
    pods = r // ranks_per_pod
    pod_R = np.arange(r) // ranks_per_pod
    key = (rows(b)[:, None, None] * num_experts + slots_BRS) * pods + pod_R[None, :, None]
    per_pod = np.bincount(key.ravel(), minlength=b * num_experts * pods)
    return per_pod.reshape(b, num_experts, pods)


def slot_weights(slots_BRS: np.ndarray, load_BE: np.ndarray) -> np.ndarray:
    """Tokens carried by every slot [B, R, S]: its expert's load over its replicas."""
    b, r, s = slots_BRS.shape
    weights = per_replica(load_BE, replica_counts(slots_BRS, load_BE.shape[1]))
    return np.take_along_axis(weights, slots_BRS.reshape(b, -1), axis=1).reshape(b, r, s)


def rank_loads(slots_BRS: np.ndarray, load_BE: np.ndarray) -> np.ndarray:
    """rank_load_BR: tokens each rank processes (with or without pods, see the module)."""
    return _sum_slots(slot_weights(slots_BRS, load_BE))


def imbalances(rank_load_BR: np.ndarray) -> np.ndarray:
    """imbalance_B: max / mean rank load, 1.0 without any load (sums rank by rank)."""
    total = np.cumsum(rank_load_BR, axis=1)[:, -1]
    worst = rank_load_BR.max(axis=1)
    ranks = rank_load_BR.shape[1]
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, worst * ranks / safe, 1.0)


def leaving_share(slots_BRS: np.ndarray, num_experts: int, ranks_per_pod: int) -> np.ndarray:
    """share_BE: the fraction of each expert's tokens that leave their pod (see the module).

    sum_p max(0, 1/P - n_p/c) = 1 - sum over the expert's slots of min(1 / (P n), 1 / c), n the
    replicas in the slot's pod: counted within each pod's block of ranks, never over all pods."""
    b, r, s = slots_BRS.shape
    pods = r // ranks_per_pod
    block = slots_BRS.reshape(b, pods, ranks_per_pod * s)
    same_pod = np.zeros(block.shape, dtype=np.int64)
    for index in range(block.shape[2]):
        same_pod += block == block[:, :, index : index + 1]
    counts = replica_counts(slots_BRS, num_experts)
    count_at = np.take_along_axis(counts, block.reshape(b, -1), axis=1).reshape(block.shape)
    kept = np.minimum(1.0 / (pods * same_pod), 1.0 / count_at)
    flat = (rows(b)[:, None] * num_experts + block.reshape(b, -1)).ravel()
    total = np.bincount(flat, weights=kept.ravel(), minlength=b * num_experts)
    held = counts > 0
    return np.where(held, 1.0 - total.reshape(b, num_experts), 0.0)


def cross_pod_fraction(
    slots_BRS: np.ndarray, load_BE: np.ndarray, ranks_per_pod: int | None
) -> np.ndarray:
    """fraction_B of top-K assignments that leave their pod when the worker routes by pod.

    0 when the whole world is one pod; NaN when the grouping is unknown (None): the worker then
    spreads every expert's tokens over all its replicas, and (P - 1) / P leave their pod."""
    b, r, _s = slots_BRS.shape
    if ranks_per_pod is None:
        return np.full(b, np.nan)
    if ranks_per_pod >= r:
        return np.zeros(b)
    share = leaving_share(slots_BRS, load_BE.shape[1], ranks_per_pod)
    total = load_BE.sum(axis=1)
    leaving = (load_BE * share).sum(axis=1)
    return np.where(total > 0, leaving / np.where(total > 0, total, 1.0), 0.0)


def moved_experts(old_BRS: np.ndarray, new_BRS: np.ndarray) -> np.ndarray:
    """moved_B: experts new to their rank, summed over ranks (`moe_contract.plan.moved_experts`).

    An expert counts once per rank however many of the rank's slots hold it."""
    s = new_BRS.shape[2]
    new_here = np.ones(new_BRS.shape, dtype=bool)
    for k in range(s):
        value = new_BRS[:, :, k : k + 1]
        first = ~(new_BRS[:, :, :k] == value).any(axis=2)
        held = (old_BRS == value).any(axis=2)
        new_here[:, :, k] = first & ~held
    return new_here.sum(axis=(1, 2))
