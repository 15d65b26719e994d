"""An EPLB-style placement, the yardstick for Replace (`moe-ep planner-bench` and the tests).

The policy of DeepSeek's published Expert Parallelism Load Balancer (github.com/deepseek-ai/EPLB,
`eplb.py`), written anew from its description with numpy (ideas only, no code taken): it plans
from scratch, ignoring where experts sit now.

- Global: give every spare slot, one by one, to the expert with the most tokens per replica; then
  pack the replicas onto ranks, heaviest first, each onto the least-loaded rank that still has a
  free slot (every rank gets exactly S).
- Hierarchical (expert groups divisible among pods, as for DeepSeek-V3's group-limited routing):
  pack groups of consecutive experts onto pods the same way, replicate within each pod over its
  own slots, then pack each pod's replicas onto its ranks. An expert's replicas all stay in its
  group's pod.

Legend: L layers, E experts, R ranks, S slots per rank, P pods, G groups.
"""

from __future__ import annotations

import numpy as np


def replicate(load_LE: np.ndarray, slots: int) -> np.ndarray:
    """counts_LE: one replica each, then each spare slot to the most tokens per replica."""
    layers, experts = load_LE.shape
    counts = np.ones((layers, experts), dtype=np.int64)
    every = np.arange(layers)
    for _ in range(slots - experts):
        counts[every, np.argmax(load_LE / counts, axis=1)] += 1
    return counts


def balanced_packing(weight_LN: np.ndarray, packs: int) -> np.ndarray:
    """pack_LN: for N items per layer, the pack (0..packs-1) of each, N / packs to a pack,
    heaviest first onto the lightest pack with room."""
    layers, items = weight_LN.shape
    per_pack = items // packs
    every = np.arange(layers)
    order = np.argsort(-weight_LN, axis=1, kind="stable")
    pack_of = np.empty((layers, items), dtype=np.int64)
    totals = np.zeros((layers, packs))
    filled = np.zeros((layers, packs), dtype=np.int64)
    for index in range(items):
        item = order[:, index]
        pack = np.argmin(np.where(filled < per_pack, totals, np.inf), axis=1)
        pack_of[every, item] = pack
        totals[every, pack] += weight_LN[every, item]
        filled[every, pack] += 1
    return pack_of


def _replicas(counts_LE: np.ndarray) -> np.ndarray:
    """experts_LN: each expert repeated by its count (N = counts' row sum)."""
    return np.stack([np.repeat(np.arange(len(row)), row) for row in counts_LE])


def _to_slots(experts_LN: np.ndarray, pack_LN: np.ndarray, ranks: int) -> np.ndarray:
    """slots_LRS from the items of each layer and the rank each goes to."""
    layers, items = experts_LN.shape
    order = np.argsort(pack_LN, axis=1, kind="stable")
    return np.take_along_axis(experts_LN, order, axis=1).reshape(layers, ranks, items // ranks)


def eplb_global(load_LE: np.ndarray, ranks: int, slots_per_rank: int) -> np.ndarray:
    """slots_LRS of the global policy."""
    counts = replicate(load_LE, ranks * slots_per_rank)
    experts = _replicas(counts)
    per_replica = np.take_along_axis(load_LE / counts, experts, axis=1)
    return _to_slots(experts, balanced_packing(per_replica, ranks), ranks)


def eplb_hierarchical(
    load_LE: np.ndarray, ranks: int, slots_per_rank: int, ranks_per_pod: int, groups: int
) -> np.ndarray:
    """slots_LRS of the hierarchical policy: `groups` groups of consecutive experts over
    ranks / ranks_per_pod pods (groups must be a multiple of the pods)."""
    layers, num_experts = load_LE.shape
    pods = ranks // ranks_per_pod
    if groups % pods or num_experts % groups:
        raise ValueError(
            f"groups {groups} must divide {num_experts} experts and be a multiple of {pods} pods"
        )
    size = num_experts // groups
    group_pod = balanced_packing(load_LE.reshape(layers, groups, size).sum(axis=2), pods)
    slots = np.empty((layers, ranks, slots_per_rank), dtype=np.int64)
    for pod in range(pods):
        # the experts of the groups packed onto this pod, in group order: [L, E / pods]
        mine = np.stack(
            [
                np.concatenate(
                    [np.arange(g * size, (g + 1) * size) for g in np.nonzero(row == pod)[0]]
                )
                for row in group_pod
            ]
        )
        local = np.take_along_axis(load_LE, mine, axis=1)
        placed = eplb_global(local, ranks_per_pod, slots_per_rank)
        slots[:, pod * ranks_per_pod : (pod + 1) * ranks_per_pod] = np.take_along_axis(
            mine[:, None, :], placed.reshape(layers, 1, -1), axis=2
        ).reshape(layers, ranks_per_pod, slots_per_rank)
    return slots
