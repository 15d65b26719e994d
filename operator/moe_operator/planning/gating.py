"""GatingBias: the seed's "gating adjustment: dynamic probability modification", priced and capped.

A per-layer bias added to the gate probabilities for top-K *selection* only (combine weights stay
the unbiased probabilities). It is NOT output-preserving: it changes which experts some tokens
visit. Workers apply it only to tokens whose choice is close (the plan's `gateMaxMargin`, see
`moe_worker.models.routing`) and count what it costs: the assignments it rerouted and the gate
probability those lost. The placement (slots) is left as it is. Shapes: L = layers, E = experts.

The update, one layer, from the loads [E] measured under the current bias b [E]:

    rel[e]  = load[e] / mean(load)                       relative load, 1 at balance
    step[e] = rate / E * clip(1 - rel[e], -1, 1) * max(rel[e], 1/2)
    b'      = (1 - damping) * b + step,  centred (mean 0), clamped to [-max_bias, max_bias]
    b'      scaled down so that max|b'| <= allowed (see below)

Why this rule (measured with `moe-ep gating-sim`, the worker's router on Zipf traffic):

- *Proportional, not a sign.* The old step `rate * sign(mean - load)` never shrinks: near
  balance it keeps jumping by `rate` and oscillates, and a rate large enough to move a very hot
  expert overshoots everywhere. A step proportional to the relative error vanishes at balance,
  so a stationary load is a fixed point and the bias settles instead of cycling.
- *Scaled by the expert's relative load.* The bias is in probability units, and a hot expert's
  gate probabilities are spread over a wider range (roughly in proportion to its share of the
  load), so moving a given fraction of its load needs a proportionally larger bias; multiplying
  by rel makes the correction roughly multiplicative (the odds of selecting e scale by a factor
  per step, as in multiplicative-weights updates). The floor 1/2 keeps an idle expert moving.
  With it, Zipf 0.5-1.5 reach their cap-limited or balanced state in 1-9 evaluations; with an
  unscaled step a rate that is stable near balance needs tens of evaluations for a hot expert.
- *In units of 1/E.* Gate probabilities average 1/E, so the same rate moves 4 or 16 experts'
  loads by about the same relative amount (measured on both).
- *Error clipped to +-1.* One window with an extreme expert cannot jump the bias.
- *Damping (a leak).* Each evaluation pulls a fraction `damping` of the bias back to 0: with
  balanced load the bias decays geometrically, so routing returns to the model's own once the
  skew is gone, and it damps the loop (the fixed point trades a residual error of about
  damping / (damping + rate x sensitivity) of the original one for a smaller bias).
- *Centred.* Selection depends only on differences between experts' biases; centring keeps the
  range [-max_bias, max_bias] for those differences.
- *Growth limit.* A bias may grow at most 2x per evaluation, and a first bias (from zero) is at
  most rate / 2E and a fifth of the price cap: the price of a bias is only known after the
  workers apply it, so it is found by doubling from a small start rather than by a blind jump.
- *Price cap.* Given the rerouted fraction the workers measured under the current bias (its
  magnitude s), the new bias is limited to s x 0.8 maxReroutedFraction / measured: the rerouted
  fraction grows about linearly with the bias for small biases (a token is rerouted when its
  margin is below the bias difference), so this shrinks a bias that costs too much and lets a
  cheap one grow only up to the cap.

Known limit: two experts whose gate scores are nearly identical can trade a few tokens back and
forth on a stationary load, a small cycle in their two biases (a few percent of the bias) that
does not move the imbalance; the update has no memory to damp it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Bias = tuple[tuple[float, ...], ...]
"""gate_bias [L][E]."""

GROWTH_PER_EVALUATION = 2.0
"""Largest factor by which a layer's bias magnitude (max |b|) may grow in one evaluation."""

FIRST_BIAS_PER_CAP = 0.2
"""A first bias (from zero) is at most this times maxReroutedFraction: in the layouts measured
(E = 4 to 16, top-2, Zipf 0.5 to 1.5) a bias of magnitude b rerouted up to about 4b of the
assignments."""

CAP_AIM = 0.8
"""The price cap aims at this fraction of maxReroutedFraction: the measured fraction varies by a
few percent between windows, and a bias whose shape changes can cost up to ~15% more than its
magnitude alone predicts (measured with gating-sim), so aiming at the cap itself overshoots."""


@dataclass(frozen=True)
class GatingOptions:
    """The gate-bias update, its bound, guard and price cap (the spec's rebalancing.gating)."""

    rate: float = 0.5
    """Bias step per unit of relative load error (scaled by the expert's relative load), in
    units of the mean gate probability 1/E. A first bias from zero is at most rate / 2E."""

    max_bias: float = 0.2
    """Largest absolute bias any expert may get: a hard bound on how far selection departs."""

    damping: float = 0.05
    """Fraction of the bias removed at every evaluation (a leak towards 0), in [0, 1)."""

    max_margin: float | None = 0.05
    """Workers bias only tokens whose K-th and (K+1)-th gate probabilities are closer than this,
    and only between experts within max_margin / 2 of that boundary, so a rerouted assignment
    loses less than this much gate probability. None: no guard (every token)."""

    max_rerouted_fraction: float | None = 0.1
    """Largest fraction of top-K assignments the bias may reroute, as measured by the workers;
    above it the bias shrinks. None: no cap."""

    def __post_init__(self) -> None:
        ranges = {
            "rate": (0.0, math.inf),
            "max_bias": (0.0, 1.0),
            "damping": (0.0, 1.0),
            "max_margin": (0.0, 1.0),
            "max_rerouted_fraction": (0.0, 1.0),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value is None and name in ("max_margin", "max_rerouted_fraction"):
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and low <= value):
                raise ValueError(f"{name}: must be a finite number >= {low:g}, got {value}")
            if value > high or (name == "damping" and value == high):
                raise ValueError(f"{name}: must be <= {high:g} (damping < 1), got {value}")


def layer_step(layer_load: Sequence[float], rate: float) -> tuple[float, ...]:
    """The proportional step [E] of one layer (before damping, centring and bounds).

    Args:
        layer_load: [E] tokens per expert over the window, mean > 0.
    Returns:
        step [E]: rate / E * clip(1 - rel, -1, 1) * max(rel, 1/2), rel = load / mean.
    """
    mean = sum(layer_load) / len(layer_load)
    unit = rate / len(layer_load)
    rels = [load / mean for load in layer_load]
    return tuple(unit * min(1.0, max(-1.0, 1.0 - rel)) * max(rel, 0.5) for rel in rels)


def allowed_magnitude(
    current: Sequence[float], rerouted_fraction: float | None, options: GatingOptions
) -> float:
    """The largest max |b| the next bias of a layer may have (growth limit and price cap).

    Args:
        current: [E] the bias the workers serve.
        rerouted_fraction: the fraction of top-K assignments they measured rerouted under it,
            or None when unknown.
    Returns:
        A magnitude >= 0 (math.inf: no limit beyond max_bias).
    """
    magnitude = max((abs(b) for b in current), default=0.0)
    cap = options.max_rerouted_fraction
    if magnitude == 0:  # the price of a bias is unknown until the workers apply it
        first = options.rate / (2 * len(current))
        return first if cap is None else min(first, FIRST_BIAS_PER_CAP * cap)
    allowed = GROWTH_PER_EVALUATION * magnitude
    if cap is not None and rerouted_fraction is not None and rerouted_fraction > 0:
        allowed = min(allowed, magnitude * CAP_AIM * cap / rerouted_fraction)
    return allowed


def update_layer_bias(
    bias: Sequence[float],
    layer_load: Sequence[float],
    options: GatingOptions,
    rerouted_fraction: float | None = None,
) -> tuple[float, ...]:
    """One update of one layer's gate bias (the rule in the module docstring).

    Args:
        bias: [E] current bias.
        layer_load: [E] tokens per expert over the window.
        rerouted_fraction: measured under `bias`, or None when unknown.
    Returns:
        bias [E], centred, within [-max_bias, max_bias] and `allowed_magnitude`. A layer
        without traffic keeps its bias (nothing was measured).
    """
    if sum(layer_load) <= 0:
        return tuple(bias)
    step = layer_step(layer_load, options.rate)
    moved = [(1 - options.damping) * b + s for b, s in zip(bias, step, strict=True)]
    centre = sum(moved) / len(moved)
    bound = options.max_bias
    new = [min(bound, max(-bound, b - centre)) for b in moved]
    magnitude = max(abs(b) for b in new)
    allowed = allowed_magnitude(bias, rerouted_fraction, options)
    if magnitude > allowed:
        new = [b * allowed / magnitude for b in new]
    return tuple(new)


def update_bias(
    bias: Sequence[Sequence[float]] | None,
    expert_load: Sequence[Sequence[float]],
    options: GatingOptions | None = None,
    rerouted_fraction: Sequence[float | None] | None = None,
) -> Bias:
    """One update of every layer's gate bias.

    Args:
        bias: [L][E] current bias, or None for all zeros.
        expert_load: [L][E] tokens per expert over the window.
        rerouted_fraction: [L] measured under `bias` (None entries: unknown), or None.
    Returns:
        bias [L][E].
    """
    options = options or GatingOptions()
    if bias is None:
        bias = [[0.0] * len(row) for row in expert_load]
    fractions = rerouted_fraction or [None] * len(expert_load)
    if len(fractions) != len(expert_load):
        raise ValueError(
            f"rerouted_fraction: has {len(fractions)} layers, the loads have {len(expert_load)}"
        )
    return tuple(
        update_layer_bias(layer_bias, layer_load, options, fraction)
        for layer_bias, layer_load, fraction in zip(bias, expert_load, fractions, strict=True)
    )
