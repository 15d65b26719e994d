"""One entry for every rebalancing method: loads + current plan -> new plan and what it does.

Methods (the MoEDeployment's `rebalancing.method`):

- `RoundRobin`: the seed's placement (section 5.1) via `moe_worker.plan.round_robin_plan`; no bias.
- `Replace`: output-preserving replication and re-packing (see `planning.replace`).
- `GatingBias`: gate-bias update on the current slots (see `planning.gating`); changes routing.
- `Auto`: `GatingBias` when nothing can be replicated (slotsPerRank 1 and E == R, the seed's
  layout), `Replace` otherwise.

Shapes: L = layers, R = ranks, S = slots per rank, E = logical experts; expert_load is [L][E].
A changed plan gets version previous.version + 1 (1 without a previous plan). When nothing is worth
changing the current plan is returned as it is (same version), and `RebalanceResult.changed` is
False: the operator then has nothing to hand off. Without a previous plan the current plan is the
round-robin plan at version 1, which every deployment starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_operator.planning.gating import GatingOptions, update_bias
from moe_operator.planning.placement import check_loads, layer_imbalances
from moe_operator.planning.replace import ReplaceOptions, nothing_to_replicate, replace_slots
from moe_worker.plan import Plan, PlanError, plan_transfers, round_robin_plan, validate_plan

AUTO, REPLACE, ROUND_ROBIN, GATING_BIAS = "Auto", "Replace", "RoundRobin", "GatingBias"
METHODS = (AUTO, REPLACE, ROUND_ROBIN, GATING_BIAS)


class PlanningError(ValueError):
    """Inputs that do not fit together; the message names the field and what would fix it."""


@dataclass(frozen=True)
class RebalanceResult:
    """A planner's output and an honest account of it.

    For Replace and RoundRobin `imbalance_after` is computed with the same loads on the new
    placement. For GatingBias it is the current imbalance: the effect of a bias shows only in the
    next window's traffic, so it is not predicted.
    """

    plan: Plan
    """The plan to serve: a new version, or the current plan itself when `changed` is False."""
    method: str
    """The method that ran (Auto resolved to Replace or GatingBias)."""
    imbalance_before: float
    """Worst layer's max/mean rank load on the current plan."""
    imbalance_after: float
    """Worst layer's max/mean rank load on the new plan (GatingBias: not predicted, = before)."""
    slots_moved: int
    """Slots, over all layers, whose expert's weights must be copied to their rank."""
    per_layer_before: tuple[float, ...]
    """Imbalance per layer [L] on the current plan."""
    per_layer_after: tuple[float, ...]
    """Imbalance per layer [L] on the new plan (GatingBias: = before)."""
    note: str
    """One sentence for status, Events and the CLI: what changed and what it means."""
    changed: bool
    """Whether `plan` differs from the current plan (and so must be handed to the workers)."""

    def summary(self) -> str:
        """`imbalance 1.83 -> 1.04, 5 slots moved (Replace): <note>` (one line).

        For GatingBias the after value reads `not predicted`: a bias shows in the next traffic.
        """
        after = (
            "not predicted"
            if self.method == GATING_BIAS and self.changed
            else f"{self.imbalance_after:.2f}"
        )
        return (
            f"imbalance {self.imbalance_before:.2f} -> {after}, "
            f"{self.slots_moved} slots moved ({self.method}): {self.note}"
        )


def choose_method(num_experts: int, world_size: int, slots_per_rank: int) -> str:
    """What Auto resolves to: GatingBias for the seed's layout, Replace where slots are spare."""
    if nothing_to_replicate(num_experts, world_size, slots_per_rank):
        return GATING_BIAS
    return REPLACE


def plan_rebalance(
    expert_load: Sequence[Sequence[float]],
    *,
    world_size: int,
    slots_per_rank: int,
    previous: Plan | None = None,
    method: str = AUTO,
    replace_options: ReplaceOptions | None = None,
    gating_options: GatingOptions | None = None,
) -> RebalanceResult:
    """Plan the next placement/bias from a window of loads.

    Args:
        expert_load: [L][E] tokens per logical expert over the window, finite and >= 0.
        world_size: R ranks.
        slots_per_rank: S slots per rank and layer (R * S >= E).
        previous: the plan the workers serve ([L][R][S] slots), or None for the round-robin start.
        method: one of METHODS.
    Returns:
        RebalanceResult whose plan has slots [L][R][S] and, for GatingBias, gate bias [L][E].
    Raises:
        PlanningError (a ValueError) naming the field when the inputs do not fit together.
    """
    loads = _checked_loads(expert_load)
    num_layers, num_experts = len(loads), len(loads[0])
    if method not in METHODS:
        raise PlanningError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    current = _current_plan(previous, num_layers, num_experts, world_size, slots_per_rank)
    resolved = choose_method(num_experts, world_size, slots_per_rank) if method == AUTO else method
    before = layer_imbalances(current.slots, loads)
    if resolved == GATING_BIAS:
        return _gating_bias(current, loads, before, gating_options or GatingOptions())
    if resolved == ROUND_ROBIN:
        target = round_robin_plan(num_layers, num_experts, world_size, slots_per_rank)
        slots, gate_bias = target.slots, None
        note = f"the seed's placement (expert e on rank e % {world_size}), no gate bias"
        unchanged = "already the seed's placement; plan unchanged"
    elif nothing_to_replicate(num_experts, world_size, slots_per_rank):
        slots, gate_bias = current.slots, current.gate_bias
        note = unchanged = (
            f"nothing to replicate: slotsPerRank 1 with as many experts as ranks ({world_size}), "
            "so every placement has the same rank loads; plan unchanged (GatingBias or more "
            "slotsPerRank can lower the imbalance)"
        )
    else:
        options = replace_options or ReplaceOptions()
        slots = replace_slots(current.slots, loads, options)
        gate_bias = current.gate_bias
        note = "output-preserving: experts replicated and re-placed, routing unchanged"
        unchanged = (
            "already balanced; plan unchanged"
            if max(before) <= 1.0
            else f"no placement gains {options.min_gain_per_move:g} imbalance per slot moved; "
            "plan unchanged"
        )
    return _result(current, resolved, slots, gate_bias, loads, before, (note, unchanged))


def _checked_loads(expert_load: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    try:
        return check_loads(expert_load)
    except ValueError as error:
        raise PlanningError(str(error)) from None


def _current_plan(
    previous: Plan | None, num_layers: int, num_experts: int, world_size: int, slots_per_rank: int
) -> Plan:
    if world_size < 1:
        raise PlanningError(f"ranks: must be >= 1, got {world_size}")
    if slots_per_rank < 1:
        raise PlanningError(f"slotsPerRank: must be >= 1, got {slots_per_rank}")
    try:
        if previous is None:
            return round_robin_plan(num_layers, num_experts, world_size, slots_per_rank)
        if previous.slots_per_rank != slots_per_rank:
            raise PlanError(
                f"slotsPerRank: the previous plan has {previous.slots_per_rank}, "
                f"asked for {slots_per_rank}; start from a round-robin plan to change it"
            )
        validate_plan(
            previous, num_layers=num_layers, num_experts=num_experts, world_size=world_size
        )
    except PlanError as error:
        prefix = "" if previous is None else "previous plan: "
        raise PlanningError(f"{prefix}{error}") from None
    return previous


def _gating_bias(
    current: Plan,
    loads: tuple[tuple[float, ...], ...],
    before: tuple[float, ...],
    options: GatingOptions,
) -> RebalanceResult:
    old_bias = current.gate_bias or tuple((0.0,) * len(row) for row in loads)
    new_bias = update_bias(old_bias, loads, options)
    steps = [
        n - o
        for new, old in zip(new_bias, old_bias, strict=True)
        for n, o in zip(new, old, strict=True)
    ]
    largest = max(abs(b) for row in new_bias for b in row)
    note = (
        "changes which experts tokens visit (not output-preserving); "
        f"bias lowered for {sum(s < 0 for s in steps)} and raised for {sum(s > 0 for s in steps)} "
        f"(layer, expert) pairs, max |bias| {largest:.3g} of {options.max_bias:.3g}; "
        "imbalance after is not predicted: the next window's traffic shows it"
    )
    changed = new_bias != old_bias
    plan = current
    if changed:
        plan = Plan(
            version=current.version + 1,
            slotsPerRank=current.slots_per_rank,
            slots=current.slots,
            gateBias=new_bias,
            method=GATING_BIAS,
        )
    else:
        note = "no bias can move (loads at the mean or biases at the bound); plan unchanged"
    return RebalanceResult(
        plan=plan,
        method=GATING_BIAS,
        imbalance_before=max(before),
        imbalance_after=max(before),
        slots_moved=0,
        per_layer_before=before,
        per_layer_after=before,
        note=note,
        changed=changed,
    )


def _result(
    current: Plan,
    method: str,
    slots: tuple[tuple[tuple[int, ...], ...], ...],
    gate_bias: tuple[tuple[float, ...], ...] | None,
    loads: tuple[tuple[float, ...], ...],
    before: tuple[float, ...],
    notes: tuple[str, str],
) -> RebalanceResult:
    """Wrap new slots/bias into the next plan version; `notes` is (if changed, if unchanged)."""
    changed = slots != current.slots or gate_bias != current.gate_bias
    plan = current
    if changed:
        plan = Plan(
            version=current.version + 1,
            slotsPerRank=current.slots_per_rank,
            slots=slots,
            gateBias=gate_bias,
            method=method,
        )
    after = layer_imbalances(plan.slots, loads)
    moved = len(plan_transfers(current, plan))  # exactly what the workers will send
    return RebalanceResult(
        plan=plan,
        method=method,
        imbalance_before=max(before),
        imbalance_after=max(after),
        slots_moved=moved,
        per_layer_before=before,
        per_layer_after=after,
        note=notes[0] if changed else notes[1],
        changed=changed,
    )
