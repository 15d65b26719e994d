"""Load model of a placement: per-expert token load -> per-rank load -> imbalance.

Pure functions over plain sequences (stdlib only). Legend for shapes, as in `moe_contract.plan`:
L = layers, R = ranks (world size), S = slots per rank, E = logical experts.

    expert_load[l][e]   tokens routed to logical expert e of layer l over the window   [L][E]
    slots[l][r][k]      logical expert held by slot k of rank r in layer l             [L][R][S]
    rank_load[r]        tokens processed by rank r in one layer                        [R]

A replicated expert's tokens are split evenly among its replicas, as the worker does, so a slot
holding expert e carries expert_load[e] / replicas(e). Imbalance of a layer is
max rank load / mean rank load: 1.0 is perfect, and a layer without any tokens counts as 1.0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Loads = tuple[tuple[float, ...], ...]
"""expert_load [L][E]: tokens per logical expert and layer, finite and non-negative."""

LayerSlots = Sequence[Sequence[int]]
"""slots of one layer [R][S]."""


class LoadError(ValueError):
    """An expert-load matrix that cannot be used; the message names the offending field."""


def check_loads(expert_load: object, *, num_experts: int | None = None) -> Loads:
    """Validate a load matrix and return it as tuples of floats.

    Args:
        expert_load: [L][E] numbers; every row the same length, finite, >= 0.
        num_experts: E, when the caller knows it; None takes the first row's length.
    Returns:
        expert_load [L][E] as tuples of floats.
    Raises:
        LoadError naming the field (`expert_load[2][5]`) and what is wrong with it.
    """
    if not isinstance(expert_load, list | tuple) or not expert_load:
        raise LoadError("expert_load: must be a non-empty list of layers (a list of lists)")
    rows: list[tuple[float, ...]] = []
    for layer, row in enumerate(expert_load):
        if not isinstance(row, list | tuple):
            raise LoadError(f"expert_load[{layer}]: must be a list of numbers, one per expert")
        expected = num_experts if num_experts is not None else len(rows[0]) if rows else None
        if expected is not None and len(row) != expected:
            raise LoadError(f"expert_load[{layer}]: has {len(row)} experts, expected {expected}")
        if not row:
            raise LoadError(f"expert_load[{layer}]: has no experts")
        values: list[float] = []
        for expert, value in enumerate(row):
            where = f"expert_load[{layer}][{expert}]"
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise LoadError(f"{where}: must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise LoadError(f"{where}: must be finite and >= 0, got {value!r}")
            values.append(float(value))
        rows.append(tuple(values))
    return tuple(rows)


def replica_counts(layer_slots: LayerSlots, num_experts: int) -> tuple[int, ...]:
    """Replicas of each logical expert in one layer.

    Args:
        layer_slots: [R][S] logical expert ids.
    Returns:
        counts [E]: slots holding each expert (0 for an expert without a slot).
    """
    counter = Counter(expert for rank_slots in layer_slots for expert in rank_slots)
    return tuple(counter.get(expert, 0) for expert in range(num_experts))


def rank_loads(layer_slots: LayerSlots, layer_load: Sequence[float]) -> tuple[float, ...]:
    """Tokens processed by each rank in one layer, replicas splitting their expert's tokens evenly.

    Args:
        layer_slots: [R][S] logical expert ids; every expert with load > 0 must have a slot.
        layer_load: [E] tokens per logical expert.
    Returns:
        rank_load [R].
    """
    counts = replica_counts(layer_slots, len(layer_load))
    return tuple(
        sum(layer_load[expert] / counts[expert] for expert in rank_slots)
        for rank_slots in layer_slots
    )


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of rank loads [R]; 1.0 when there is no load at all."""
    total = sum(loads)
    if total <= 0:
        return 1.0
    return max(loads) * len(loads) / total


def layer_imbalances(
    slots: Sequence[LayerSlots], expert_load: Sequence[Sequence[float]]
) -> tuple[float, ...]:
    """Imbalance of every layer of a placement.

    Args:
        slots: [L][R][S] logical expert ids.
        expert_load: [L][E] tokens per logical expert.
    Returns:
        imbalance [L], each >= 1.0.
    """
    return tuple(
        imbalance(rank_loads(layer_slots, layer_load))
        for layer_slots, layer_load in zip(slots, expert_load, strict=True)
    )
