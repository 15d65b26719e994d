"""One entry for every rebalancing method: loads + current plan -> new plan and what it does.

Methods (the MoEDeployment's `rebalancing.method`):

- `RoundRobin`: the seed's placement (section 5.1) via `moe_contract.plan.round_robin_plan`;
  no bias.
- `Replace`: output-preserving replication and re-packing (see `planning.replace`). Where the
  deployment allows more slots per rank than the plan has (`max_slots_per_rank`, memory the ranks
  have to spare) it may grow the plan's slots per rank, one or more at once, when the balance
  gained pays for the weights moved (the same price per slot moved as re-packing). A Replace plan
  carries no gate bias: its outputs are the model's own.
- `GatingBias`: gate-bias update on the current slots (see `planning.gating`); changes routing.
- `Auto`: spare memory first. `Replace` wherever a slot is spare or can be added; `GatingBias`
  only where nothing can be replicated (slotsPerRank 1 and E == R, the seed's layout) and no
  slot can be added. A plan Auto issues also anticipates a lost rank: where a layer has slots
  for two replicas of every expert and it costs the layer's balance little
  (`REDUNDANCY_TOLERANCE`), every expert is on two ranks of two pods
  (`moe_contract.elastic.spread_replicas`), so the loss of one pod leaves every expert served
  and the survivors move nothing; where balance needs those slots (a skew the slots can only
  just even out), balance wins.

Shapes: L = layers, R = ranks, S = slots per rank, E = logical experts; expert_load is [L][E].
A changed plan gets version previous.version + 1 (1 without a previous plan). When nothing is worth
changing the current plan is returned as it is (same version), and `RebalanceResult.changed` is
False: the operator then has nothing to hand off. Without a previous plan the current plan is the
round-robin plan at version 1, which every deployment starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_contract.elastic import spread_replicas
from moe_contract.plan import (
    Plan,
    PlanError,
    plan_transfers,
    round_robin_plan,
    validate_plan,
)
from moe_operator.planning import arrays
from moe_operator.planning.gating import Bias, GatingOptions, update_bias
from moe_operator.planning.placement import check_loads, layer_imbalances
from moe_operator.planning.replace import (
    Pricing,
    ReplaceOptions,
    Slots,
    ideal_imbalance,
    nothing_to_replicate,
    replace_slots,
)

AUTO, REPLACE, ROUND_ROBIN, GATING_BIAS = "Auto", "Replace", "RoundRobin", "GatingBias"
METHODS = (AUTO, REPLACE, ROUND_ROBIN, GATING_BIAS)

REDUNDANCY_TOLERANCE = 0.05
"""Auto spreads a layer's replicas over two ranks of two pods for every expert when that raises
the layer's predicted imbalance (max/mean) by at most this fraction."""

NEGLIGIBLE_BIAS = 1e-4
"""Gate-probability change below which a bias is not worth a new plan (it can only reroute
tokens whose top-K choice is closer than twice this), and below which a decaying bias is
removed."""


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
    cross_pod_before: float | None = None
    """Predicted fraction of top-K assignments that leave their pod on the current plan, all
    layers weighted by their tokens (None: no pods; a plan without ranksPerPod spreads every
    expert's tokens over all its replicas)."""
    cross_pod_after: float | None = None
    """The same on the new plan, which carries the deployment's ranksPerPod."""

    def summary(self) -> str:
        """`imbalance 1.83 -> 1.04, 5 slots moved (Replace): <note>` (one line).

        For GatingBias the after value reads `not predicted`: a bias shows in the next traffic.
        """
        after = (
            "not predicted"
            if self.method == GATING_BIAS and self.changed
            else f"{self.imbalance_after:.2f}"
        )
        pods = ""
        if self.cross_pod_before is not None and self.cross_pod_after is not None:
            pods = (
                f", cross-pod {self.cross_pod_before:.1%} -> {self.cross_pod_after:.1%} of "
                "assignments"
            )
        return (
            f"imbalance {self.imbalance_before:.2f} -> {after}, "
            f"{self.slots_moved} slots moved{pods} ({self.method}): {self.note}"
        )


def choose_method(
    num_experts: int, world_size: int, slots_per_rank: int, max_slots_per_rank: int | None = None
) -> str:
    """What Auto resolves to: Replace where a slot is spare or can be added (spare memory
    first), GatingBias only for the seed's layout with no slot to add."""
    can_grow = max_slots_per_rank is not None and max_slots_per_rank > slots_per_rank
    if nothing_to_replicate(num_experts, world_size, slots_per_rank) and not can_grow:
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
    max_slots_per_rank: int | None = None,
    rerouted_fraction: Sequence[float | None] | None = None,
    ranks_per_pod: int | None = None,
) -> RebalanceResult:
    """Plan the next placement/bias from a window of loads.

    Args:
        expert_load: [L][E] tokens per logical expert over the window, finite and >= 0.
        world_size: R ranks.
        slots_per_rank: S slots per rank and layer the deployment starts with (R * S >= E).
        previous: the plan the workers serve ([L][R][S'] slots, S <= S' <= max), or None for
            the round-robin start.
        method: one of METHODS.
        max_slots_per_rank: the most slots per rank the ranks have memory for (None: S); Replace
            and Auto may grow the plan up to it.
        rerouted_fraction: [L] fraction of top-K assignments the workers measured rerouted by
            the current bias (None entries or None: unknown); GatingBias shrinks the bias of a
            layer above `gating_options.max_rerouted_fraction`.
        ranks_per_pod: ranks of one pod (`worker.ranksPerPod`); a new plan carries it, the
            workers then keep tokens in their pod where balance allows, and Replace places
            replicas so that fewer leave (at equal balance). None, 1 or R: no grouping.
    Returns:
        RebalanceResult whose plan has slots [L][R][S''] and, for GatingBias, gate bias [L][E]
        and the guard's margin.
    Raises:
        PlanningError (a ValueError) naming the field when the inputs do not fit together.
    """
    loads = _checked_loads(expert_load)
    num_layers, num_experts = len(loads), len(loads[0])
    if method not in METHODS:
        raise PlanningError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    max_slots = _max_slots(slots_per_rank, max_slots_per_rank)
    pods = _pods(ranks_per_pod, world_size)
    current = _current_plan(
        previous, num_layers, num_experts, world_size, slots_per_rank, max_slots
    )
    if method == AUTO:
        resolved = choose_method(num_experts, world_size, current.slots_per_rank, max_slots)
    else:
        resolved = method
    before = layer_imbalances(current.slots, loads)
    if resolved == GATING_BIAS:
        options = gating_options or GatingOptions()
        return _gating_bias(current, loads, before, options, rerouted_fraction)
    if resolved == ROUND_ROBIN:
        target = round_robin_plan(num_layers, num_experts, world_size, slots_per_rank)
        note = f"the seed's placement (expert e on rank e % {world_size}), no gate bias"
        unchanged = "already the seed's placement; plan unchanged"
        notes = (note, unchanged)
        return _result(current, resolved, target.slots, None, loads, before, notes, pods)
    options = replace_options or ReplaceOptions()
    return _replace(current, loads, before, max_slots, options, pods, redundant=method == AUTO)


def _pods(ranks_per_pod: int | None, world_size: int) -> int | None:
    """Ranks per pod where the world spans several pods of several ranks, else None: pods of one
    rank (one GPU, or CPU workers) say nothing of which ranks share a node's fast links."""
    if ranks_per_pod is None or ranks_per_pod >= world_size or ranks_per_pod == 1:
        return None
    if ranks_per_pod < 1 or world_size % ranks_per_pod:
        raise PlanningError(
            f"ranksPerPod: {ranks_per_pod} does not divide the {world_size} ranks; "
            "use the deployment's worker.ranksPerPod"
        )
    return ranks_per_pod


def _max_slots(slots_per_rank: int, max_slots_per_rank: int | None) -> int:
    if max_slots_per_rank is None:
        return slots_per_rank
    if max_slots_per_rank < slots_per_rank:
        raise PlanningError(
            f"maxSlotsPerRank: {max_slots_per_rank} is below slotsPerRank {slots_per_rank}; "
            "set it to at least slotsPerRank"
        )
    return max_slots_per_rank


def _replace(
    current: Plan,
    loads: tuple[tuple[float, ...], ...],
    before: tuple[float, ...],
    max_slots: int,
    options: ReplaceOptions,
    pods: int | None,
    redundant: bool = False,
) -> RebalanceResult:
    """Replace at the current slots per rank or at any size up to `max_slots`, whichever costs
    least in the planner's own terms: the sum over layers of `ReplaceOptions.cost` (every size
    priced against the ideal of the largest and the current plan's slots), among the sizes at
    which no layer carries more than it does now."""
    num_experts, world_size = len(loads[0]), current.world_size
    load = np.asarray(loads, dtype=np.float64)
    pricing = Pricing(
        ideal_imbalance(load, world_size, max_slots), world_size * current.slots_per_rank
    )
    stay = float(
        options.cost(np.asarray(before), np.zeros(len(before)), pricing.ideal, pricing.slots).sum()
    )
    best: tuple[float, int] | None = None
    slots = current.slots
    for size in range(current.slots_per_rank, max_slots + 1):
        if nothing_to_replicate(num_experts, world_size, size):
            continue  # re-placing a permutation changes no rank load
        chosen = replace_slots(
            current.slots, load, options, ranks_per_pod=pods, pricing=pricing, slots_per_rank=size
        )
        if not chosen.fits.all():
            continue  # a layer would carry more than it does now: not at this size
        cost = (
            float(options.cost(chosen.after, chosen.moved, pricing.ideal, pricing.slots).sum()),
            size,
        )
        if best is None or cost < best:
            best, slots = cost, chosen.as_tuples()
    if best is None or best[0] >= stay:
        slots = current.slots  # nothing (no size) gains more than its moves cost
    elif redundant:  # a new plan anyway: one that a lost rank (or pod) leaves whole
        slots = _redundant(slots, loads, pods)
    size = len(slots[0][0])
    dropped = " gate bias removed: routing is the model's own again;" if current.gate_bias else ""
    grew = (
        f" slots per rank grown {current.slots_per_rank} -> {size} (memory the ranks have to "
        "spare);"
        if size > current.slots_per_rank
        else ""
    )
    note = f"output-preserving:{grew}{dropped} experts replicated and re-placed, routing unchanged"
    if nothing_to_replicate(num_experts, world_size, current.slots_per_rank) and size == max_slots:
        unchanged = (
            f"nothing to replicate: slotsPerRank 1 with as many experts as ranks ({world_size}), "
            "so every placement has the same rank loads; plan unchanged (GatingBias or more "
            "slots per rank (placement.maxSlotsPerRank) can lower the imbalance)"
        )
    elif max(before) <= 1.0:
        unchanged = "already balanced; plan unchanged"
    else:
        unchanged = f"no placement is worth its moves ({options.rule()}); plan unchanged"
    notes = (note, unchanged)
    return _result(current, REPLACE, slots, None, loads, before, notes, pods)


def _redundant(slots: Slots, loads: tuple[tuple[float, ...], ...], pods: int | None) -> Slots:
    """Each layer spread over two ranks of two pods per expert, where that costs its balance at
    most REDUNDANCY_TOLERANCE."""
    spread = spread_replicas(slots, loads, pods)
    balanced, redundant = layer_imbalances(slots, loads), layer_imbalances(spread, loads)
    return tuple(
        wide if after <= before * (1 + REDUNDANCY_TOLERANCE) else layer
        for layer, wide, before, after in zip(slots, spread, balanced, redundant, strict=True)
    )


def _checked_loads(expert_load: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    try:
        return check_loads(expert_load)
    except ValueError as error:
        raise PlanningError(str(error)) from None


def _current_plan(
    previous: Plan | None,
    num_layers: int,
    num_experts: int,
    world_size: int,
    slots_per_rank: int,
    max_slots: int,
) -> Plan:
    if world_size < 1:
        raise PlanningError(f"ranks: must be >= 1, got {world_size}")
    if slots_per_rank < 1:
        raise PlanningError(f"slotsPerRank: must be >= 1, got {slots_per_rank}")
    try:
        if previous is None:
            return round_robin_plan(num_layers, num_experts, world_size, slots_per_rank)
        if previous.slots_per_rank < slots_per_rank:
            raise PlanError(
                f"slotsPerRank: the previous plan has {previous.slots_per_rank}, "
                f"asked for {slots_per_rank}; start from a round-robin plan to change it"
            )
        validate_plan(
            previous,
            num_layers=num_layers,
            num_experts=num_experts,
            world_size=world_size,
            max_slots_per_rank=max_slots,
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
    rerouted_fraction: Sequence[float | None] | None,
) -> RebalanceResult:
    old_bias = current.gate_bias or tuple((0.0,) * len(row) for row in loads)
    try:
        new_bias = update_bias(old_bias, loads, options, rerouted_fraction)
    except ValueError as error:
        raise PlanningError(str(error)) from None
    steps = [
        n - o
        for new, old in zip(new_bias, old_bias, strict=True)
        for n, o in zip(new, old, strict=True)
    ]
    largest = max(abs(b) for row in new_bias for b in row)
    cap = options.max_rerouted_fraction
    over = [
        layer
        for layer, fraction in enumerate(rerouted_fraction or ())
        if cap is not None and fraction is not None and fraction > cap
    ]
    priced = (
        f"; bias shrunk on {len(over)} layers whose measured rerouted fraction exceeds "
        f"{cap:g} (layers {over[:8]})"
        if over
        else ""
    )
    guard = (
        "every token"
        if options.max_margin is None
        else f"tokens whose top-K choice is within {options.max_margin:g}"
    )
    note = (
        f"changes which experts tokens visit (not output-preserving), only for {guard}; "
        f"bias lowered for {sum(s < 0 for s in steps)} and raised for {sum(s > 0 for s in steps)} "
        f"(layer, expert) pairs, max |bias| {largest:.3g} of {options.max_bias:.3g}{priced}; "
        "imbalance after is not predicted: the next window's traffic shows it"
    )
    plan = _gated_plan(current, new_bias, options.max_margin, options.damping)
    changed = plan is not current
    if not changed:
        note = (
            f"no bias moves by {NEGLIGIBLE_BIAS:g} or more (loads near the mean, biases at "
            "their bound or price cap); plan unchanged"
        )
    elif plan.gate_bias is None:
        note = "gate bias decayed to nothing and removed: routing is the model's own again"
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


def _gated_plan(current: Plan, new_bias: Bias, max_margin: float | None, damping: float) -> Plan:
    """The next GatingBias plan, or `current` itself when no bias moved by NEGLIGIBLE_BIAS (no
    plan churn from noise); a bias whose every entry fell below it is removed.

    A small bias that only decays moves by damping x its size, which can be below
    NEGLIGIBLE_BIAS long before the bias is: such a move still counts when it is at least half
    the leak, so the decay goes on until the bias is removed instead of stalling.
    """
    old = current.gate_bias
    if max(abs(b) for row in new_bias for b in row) < NEGLIGIBLE_BIAS:
        if old is None:
            return current
        bias, margin = None, None
    else:
        bias, margin = new_bias, max_margin
        if old is not None and margin == current.gate_max_margin:
            threshold = NEGLIGIBLE_BIAS
            if damping > 0:
                scale = max(abs(b) for row in old for b in row)
                threshold = min(threshold, damping / 2 * scale)
            moved = max(
                abs(n - o)
                for new_row, old_row in zip(new_bias, old, strict=True)
                for n, o in zip(new_row, old_row, strict=True)
            )
            if moved < threshold:
                return current
    return Plan(
        version=current.version + 1,
        slotsPerRank=current.slots_per_rank,
        slots=current.slots,
        gateBias=bias,
        gateMaxMargin=margin,
        method=GATING_BIAS,
        ranksPerPod=current.ranks_per_pod,
    )


def _result(
    current: Plan,
    method: str,
    slots: tuple[tuple[tuple[int, ...], ...], ...],
    gate_bias: tuple[tuple[float, ...], ...] | None,
    loads: tuple[tuple[float, ...], ...],
    before: tuple[float, ...],
    notes: tuple[str, str],
    pods: int | None = None,
) -> RebalanceResult:
    """Wrap new slots/bias into the next plan version; `notes` is (if changed, if unchanged).
    A new plan carries `pods` as its ranksPerPod."""
    changed = slots != current.slots or gate_bias != current.gate_bias
    plan = current
    if changed:
        plan = Plan(
            version=current.version + 1,
            slotsPerRank=len(slots[0][0]),
            slots=slots,
            gateBias=gate_bias,
            method=method,
            ranksPerPod=pods,
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
        cross_pod_before=cross_pod(current, loads, pods),
        cross_pod_after=cross_pod(plan, loads, pods),
    )


def cross_pod(plan: Plan, loads: Sequence[Sequence[float]], pods: int | None) -> float | None:
    """Predicted fraction of top-K assignments that leave their pod under `plan`, all layers
    weighted by their tokens; None without pods. A plan without ranksPerPod spreads each
    expert's tokens over all its replicas: (P - 1) / P leave."""
    if pods is None:
        return None
    load = np.asarray(loads, dtype=np.float64)
    total = load.sum()
    if total <= 0:
        return 0.0
    if plan.ranks_per_pod is None:
        return 1 - pods / plan.world_size
    slots = np.asarray(plan.slots, dtype=np.int64)
    per_layer = arrays.cross_pod_fraction(slots, load, plan.ranks_per_pod)
    return float((per_layer * load.sum(axis=1)).sum() / total)
