"""Detection: when to rebalance, as a pure state machine over evaluations.

The operator evaluates every window: it turns two counter snapshots into a load matrix
(`counter_deltas`), computes imbalance per layer on the current plan, and calls `evaluate`. The
state lives in the MoEDeployment's status (status.detection, read back by `from_dict`); plan
versions are the ledger's (`ledger.Ledger`), which the observation carries.

Rules, in order:

1. A plan in flight (desired version newer than the one the workers report) blocks any new plan,
   and restarts the count of consecutive evaluations: loads measured across a switch are mixed.
2. An evaluation without usable data (counter reset, missing pods, mismatched counters) is skipped,
   never acted on, and restarts the count: a rebalance needs consecutive *usable* evidence.
3. The worst layer above `threshold` extends the streak, at or below it ends the streak.
4. A streak of `consecutive` evaluations acts, unless within `cooldown_seconds` of the last
   rebalance; acting restarts the streak, so a plan that changes nothing is retried only after
   another full streak.

Times are seconds since the epoch (floats), supplied by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from enum import StrEnum
from typing import Any

from moe_operator.planning.ledger import Ledger

CounterKey = tuple[int, int]
"""(layer, logical expert) of a `moe_expert_tokens_total` counter."""

Snapshot = Mapping[str, Mapping[CounterKey, float]]
"""source (pod name or rank) -> (layer, expert) -> cumulative token count."""


@dataclass(frozen=True)
class DetectionPolicy:
    """When imbalance turns into a rebalance (the spec's rebalancing settings)."""

    threshold: float = 1.25
    """Act when the worst layer's max/mean rank load stays above this (>= 1.0)."""
    consecutive: int = 3
    """Evaluations in a row above the threshold before acting (>= 1)."""
    cooldown_seconds: float = 300.0
    """No new plan within this many seconds of the last one (>= 0)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold < 1.0:
            raise ValueError(f"threshold: must be a finite number >= 1.0, got {self.threshold}")
        if self.consecutive < 1:
            raise ValueError(f"consecutive: must be >= 1, got {self.consecutive}")
        if not math.isfinite(self.cooldown_seconds) or self.cooldown_seconds < 0:
            raise ValueError(
                f"cooldown_seconds: must be finite and >= 0, got {self.cooldown_seconds}"
            )


@dataclass(frozen=True)
class DetectionState:
    """What detection remembers between evaluations; stored in status.detection."""

    above_count: int = 0
    """Consecutive usable evaluations with the worst layer above the threshold."""
    last_rebalance_at: float | None = None
    """When the last plan was issued, seconds since the epoch; None if never."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DetectionState:
        """Read status.detection back; missing keys (a fresh status) take the defaults."""
        data = data or {}
        last = data.get("lastRebalanceAt")
        return cls(
            above_count=int(data.get("aboveCount", 0)),
            last_rebalance_at=None if last is None else float(last),
        )


@dataclass(frozen=True)
class Observation:
    """One evaluation's input."""

    layer_imbalance: tuple[float, ...] = ()
    """Imbalance per layer [L] on the current plan; empty when the window was not usable."""
    ledger: Ledger = field(default_factory=Ledger)
    """Plan versions: issued, and served by the workers (as last reported)."""
    skip_reason: str | None = None
    """Why the window's data cannot be used (from `counter_deltas`), or None."""


class Action(StrEnum):
    REBALANCE = "Rebalance"
    """Compute a plan now; then call `plan_issued` if it is handed to the workers."""
    HOLD = "Hold"
    """Nothing to do (balanced, streak too short, cooldown, or plan in flight)."""
    SKIP = "Skip"
    """The window's data was not usable; nothing was judged."""


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    """A sentence for a condition or an Event."""
    worst_layer: int | None = None
    worst_imbalance: float | None = None


def evaluate(
    state: DetectionState, observation: Observation, now: float, policy: DetectionPolicy
) -> tuple[DetectionState, Decision]:
    """One evaluation: the next state and what to do (see the module docstring for the rules)."""
    ledger = observation.ledger
    if ledger.in_flight:
        reason = f"plan version {ledger.desired} in flight (workers serve version {ledger.applied})"
        return _replace(state, above_count=0), Decision(Action.HOLD, reason)
    if observation.skip_reason is not None or not observation.layer_imbalance:
        reason = observation.skip_reason or "no load data in this window"
        return _replace(state, above_count=0), Decision(Action.SKIP, f"skipped: {reason}")
    values = observation.layer_imbalance
    worst_layer = max(range(len(values)), key=lambda layer: (values[layer], -layer))
    worst = values[worst_layer]
    if not worst > policy.threshold:
        reason = f"balanced: worst layer {worst_layer} at {worst:.2f} <= {policy.threshold:.2f}"
        return _replace(state, above_count=0), Decision(Action.HOLD, reason, worst_layer, worst)
    count = state.above_count + 1
    above = f"worst layer {worst_layer} at {worst:.2f} > {policy.threshold:.2f}"
    if count < policy.consecutive:
        reason = f"{above} ({count} of {policy.consecutive} evaluations)"
        return _replace(state, above_count=count), Decision(Action.HOLD, reason, worst_layer, worst)
    if state.last_rebalance_at is not None:
        left = state.last_rebalance_at + policy.cooldown_seconds - now
        if left > 0:
            reason = f"{above}, but in cooldown for {left:.0f}s more"
            return _replace(state, above_count=count), Decision(
                Action.HOLD, reason, worst_layer, worst
            )
    reason = f"{above} for {count} evaluations"
    return _replace(state, above_count=0), Decision(Action.REBALANCE, reason, worst_layer, worst)


def plan_issued(state: DetectionState, now: float) -> DetectionState:
    """Record that a plan was issued at `now` (starts the cooldown; its version is the
    ledger's, `Ledger.issue`)."""
    return _replace(state, last_rebalance_at=now, above_count=0)


@dataclass(frozen=True)
class LoadWindow:
    """Loads over a window, or why there are none."""

    expert_load: tuple[tuple[float, ...], ...] | None = None
    """[L][E] tokens per logical expert summed over sources; None when skipped."""
    skip_reason: str | None = None
    sources: tuple[str, ...] = field(default=())
    """The sources (pods or ranks) that contributed, sorted."""

    @property
    def usable(self) -> bool:
        return self.expert_load is not None


def counter_deltas(
    previous: Snapshot,
    current: Snapshot,
    *,
    num_layers: int,
    num_experts: int,
    expected_sources: Collection[str] | None = None,
) -> LoadWindow:
    """Token loads over a window from two snapshots of per-source cumulative counters.

    Args:
        previous, current: source -> (layer, expert) -> cumulative count (the same sources and
            keys in both; a worker exports counters only for the experts it holds).
        num_layers, num_experts: L and E of the model.
        expected_sources: every source that must be present (e.g. the StatefulSet's pods).
    Returns:
        LoadWindow with expert_load [L][E] (sum over sources of current - previous), or a
        skip_reason when any source is missing, any counter went down (a restarted worker), the
        keys differ between snapshots (e.g. a plan switch added counters), or a value is not a
        finite number or out of range. Never partial data.
    """
    expected = set(expected_sources) if expected_sources is not None else set(previous)
    for name, snapshot in (("previous", previous), ("current", current)):
        missing = sorted(expected - set(snapshot))
        if missing:
            return LoadWindow(skip_reason=f"{name} snapshot lacks sources {missing}")
    if set(previous) != set(current):
        extra = sorted(set(previous) ^ set(current))
        return LoadWindow(skip_reason=f"sources differ between snapshots: {extra}")
    if not current:
        return LoadWindow(skip_reason="no sources")
    totals = [[0.0] * num_experts for _ in range(num_layers)]
    for source in sorted(current):
        before, after = previous[source], current[source]
        if set(before) != set(after):
            changed = sorted(set(before) ^ set(after))[:3]
            return LoadWindow(skip_reason=f"{source}: counters differ between snapshots {changed}")
        for key in sorted(after):
            problem = _counter_problem(key, before[key], after[key], num_layers, num_experts)
            if problem:
                return LoadWindow(skip_reason=f"{source}: {problem}")
            layer, expert = key
            totals[layer][expert] += after[key] - before[key]
    return LoadWindow(
        expert_load=tuple(tuple(row) for row in totals), sources=tuple(sorted(current))
    )


def _counter_problem(
    key: CounterKey, before: float, after: float, num_layers: int, num_experts: int
) -> str | None:
    layer, expert = key
    where = f"layer {layer} expert {expert}"
    if not (0 <= layer < num_layers and 0 <= expert < num_experts):
        return f"{where} is outside the model ({num_layers} layers x {num_experts} experts)"
    for value in (before, after):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{where}: counter value {value!r} is not a number"
        if not math.isfinite(value) or value < 0:
            return f"{where}: counter value {value!r} is not a finite count"
    if after < before:
        return f"{where}: counter went down ({before:g} -> {after:g}): worker restarted?"
    return None
