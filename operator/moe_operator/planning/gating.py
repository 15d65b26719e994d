"""GatingBias: the seed's "gating adjustment: dynamic probability modification".

A per-layer bias added to the gate scores for top-K *selection* only (combine weights still come
from the unbiased scores). Each evaluation nudges every expert's bias towards the mean load:

    b[l][e] += rate * sign(mean_l - load[l][e]),  clamped to [-max_bias, +max_bias]

so an overloaded expert becomes less likely to be selected and an underloaded one more. This is
NOT output-preserving: it changes which experts tokens visit, so the model's outputs change. The
placement (slots) is left as it is. The effect on the loads cannot be known without traffic, so
nothing here predicts it. Shapes: L = layers, E = logical experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Bias = tuple[tuple[float, ...], ...]
"""gate_bias [L][E]."""


@dataclass(frozen=True)
class GatingOptions:
    """Step and bound of the gate-bias update."""

    rate: float = 0.01
    """Bias step per evaluation, in gate-score units (the gate's probabilities)."""

    max_bias: float = 0.1
    """Largest absolute bias any expert may get; bounds how far routing departs from the model's."""

    def __post_init__(self) -> None:
        for name in ("rate", "max_bias"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be finite and >= 0, got {value}")


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def update_layer_bias(
    bias: Sequence[float], layer_load: Sequence[float], options: GatingOptions
) -> tuple[float, ...]:
    """One update of one layer's gate bias.

    Args:
        bias: [E] current bias.
        layer_load: [E] tokens per expert over the window.
    Returns:
        bias [E]: b + rate * sign(mean - load), clamped to [-max_bias, max_bias]. An expert exactly
        at the mean (or a layer without traffic) keeps its bias.
    """
    mean = sum(layer_load) / len(layer_load)
    return tuple(
        min(options.max_bias, max(-options.max_bias, b + options.rate * _sign(mean - load)))
        for b, load in zip(bias, layer_load, strict=True)
    )


def update_bias(
    bias: Sequence[Sequence[float]] | None,
    expert_load: Sequence[Sequence[float]],
    options: GatingOptions | None = None,
) -> Bias:
    """One update of every layer's gate bias.

    Args:
        bias: [L][E] current bias, or None for all zeros.
        expert_load: [L][E] tokens per expert over the window.
    Returns:
        bias [L][E].
    """
    options = options or GatingOptions()
    if bias is None:
        bias = [[0.0] * len(row) for row in expert_load]
    return tuple(
        update_layer_bias(layer_bias, layer_load, options)
        for layer_bias, layer_load in zip(bias, expert_load, strict=True)
    )
