"""One control step of expert-load balancing: hand off a pending plan, measure, detect, re-plan.

The decisions are the pure functions of `planning/` (detection, planners) and `perf/`; this
module sequences them around three injected doors to the outside — the workers (`Workers`), the
plan's durable record (`PlanStore`) and a clock — so the kmock and unit tests drive it directly.

Ordering keeps the plan safe across failures: a new plan is written to the ConfigMap (the durable
record) before it is posted, so an operator that dies in between re-sends it on restart; the
leader ignores a version it already serves, so nothing is applied twice. Versions are the
ledger's (`planning.ledger`): they only go up, and a plan of the desired version or newer with
other contents is someone else's, so the operator's desired plan is issued again above it.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from moe_contract.plan import Plan
from moe_operator.api import MoEDeploymentSpec, RebalanceRecord
from moe_operator.handoff import HandoffError, HandoffResult, PlanRefused, Served
from moe_operator.loads import CounterSnapshot, LoadReadError, layer_tokens
from moe_operator.perf import predicted_gain
from moe_operator.perf.profiles import load_profile
from moe_operator.perf.types import Layout, Profile
from moe_operator.planning import detection
from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.ledger import Ledger, NoVersionLeft
from moe_operator.planning.placement import imbalance
from moe_operator.planning.planners import GATING_BIAS, plan_rebalance

logger = logging.getLogger(__name__)


class Workers(Protocol):
    def read_counters(self) -> CounterSnapshot: ...  # raises LoadReadError
    def serving(self) -> Served: ...  # raises HandoffError
    def post_plan(self, plan: Plan) -> HandoffResult: ...  # raises HandoffError


class PlanStoreConflict(RuntimeError):
    """The durable record changed since the step read it: decide again on the next step."""


class PlanStore(Protocol):
    def write(self, plan: Plan, record: RebalanceRecord | None, issued_at: float) -> None:
        """Write `plan` (and what status needs back if lost); raises PlanStoreConflict."""


@dataclass
class Window:
    """Counters at the start of the current evaluation window (kept in the operator's memo)."""

    snapshot: CounterSnapshot | None = None
    started_at: float = 0.0
    last_layer_imbalance: tuple[float, ...] = ()
    last_rerouted_fraction: tuple[float | None, ...] = ()
    """Per layer, the share of top-K assignments the gate bias rerouted in the last window."""
    last_loads_problem: str | None = None  # why the last read was unusable; None once one is
    last_refusal: str | None = None  # the leader's last refusal of a plan, announced once


@dataclass
class StepOutcome:
    desired: Plan
    ledger: Ledger  # the plan versions after the step
    in_contact: bool  # the leader said what it serves, a plan of ours: plans may go to it
    state: detection.DetectionState
    layer_imbalance: tuple[float, ...]
    rerouted_fraction: tuple[float | None, ...] = ()
    loads_problem: str | None = None
    handoff_problem: str | None = None
    skipped: str | None = None  # this step's evaluation was skipped: "unreadable" | "unusable"
    rebalance: RebalanceRecord | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def _fraction(value: float | None) -> float | None:
    return None if value is None else round(min(1.0, max(0.0, value)), 4)


def _iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rank_layer_imbalance(
    previous: CounterSnapshot, current: CounterSnapshot, num_layers: int
) -> tuple[float, ...]:
    """Measured imbalance per layer [L]: max over ranks / mean over ranks of tokens processed."""
    tokens = layer_tokens(previous, current, num_layers)
    ranks = sorted(tokens)
    return tuple(imbalance([tokens[rank][layer] for rank in ranks]) for layer in range(num_layers))


def rerouted_fractions(
    previous: CounterSnapshot, current: CounterSnapshot, num_layers: int
) -> tuple[float | None, ...]:
    """Measured price of the gate bias per layer [L]: top-K assignments it rerouted over the
    window (every rank's `moe_gate_rerouted_total`) / all top-K assignments of the layer (every
    rank's `moe_expert_tokens_total`: each assignment is processed by exactly one slot). None
    for a layer some rank did not count in both snapshots (a worker without the counter, or
    restarted), or without traffic."""
    tokens = layer_tokens(previous, current, num_layers)
    fractions: list[float | None] = []
    for layer in range(num_layers):
        rerouted, known = 0.0, True
        for rank in current.counters:
            now = current.rerouted.get(rank, {}).get(layer)
            before = previous.rerouted.get(rank, {}).get(layer)
            known = known and now is not None and before is not None and now >= before
            if known:
                assert now is not None and before is not None
                rerouted += now - before
        total = sum(tokens[rank][layer] for rank in current.counters)
        fractions.append(rerouted / total if known and total > 0 else None)
    return tuple(fractions)


def over_cap(fractions: tuple[float | None, ...], cap: float | None) -> list[tuple[int, float]]:
    """(layer, measured fraction) of the layers whose rerouted fraction exceeds the cap."""
    if cap is None:
        return []
    return [(layer, f) for layer, f in enumerate(fractions) if f is not None and f > cap]


def _by_source(snapshot: CounterSnapshot) -> dict[str, dict[tuple[int, int], float]]:
    return {f"rank-{rank}": dict(counters) for rank, counters in snapshot.counters.items()}


@lru_cache(maxsize=4)
def _profile(device: str) -> Profile:
    return load_profile("h100-sxm" if device == "cuda" else "cpu-local")


def predicted_effect(
    spec: MoEDeploymentSpec,
    before: float,
    after: float,
    moved: int,
    cross_pod: tuple[float | None, float | None] = (None, None),
) -> tuple[float, float]:
    """(throughput gain, seconds to move the slots) by the performance model; (1, 0) if unknown.
    `cross_pod`: the plans' predicted cross-pod fractions before and after (None: uniform)."""
    shape = spec.model.to_shape()
    layout = Layout(ep=spec.parallelism.expert, slots_per_rank=spec.placement.slots_per_rank)
    bytes_per_slot = shape.expert_params * shape.dtype_bytes
    try:
        return predicted_gain(
            shape,
            layout,
            _profile(spec.worker.device),
            before,
            after,
            moved,
            bytes_per_slot,
            cross_before=cross_pod[0],
            cross_after=cross_pod[1],
        )
    except (ValueError, OSError, ZeroDivisionError) as error:
        logger.warning("performance model unavailable: %s", error)
        return 1.0, 0.0


def _hand_off(workers: Workers, desired: Plan, outcome: StepOutcome, window: Window) -> None:
    """Post the desired plan to the leader while it is in flight; the ledger learns the answer."""
    if not outcome.in_contact or not outcome.ledger.in_flight:
        return
    try:
        result = workers.post_plan(desired)
        if result.stale:  # serves this version or newer already: ours only if the digest is
            served = workers.serving()
            if not outcome.ledger.is_ours(served.version, served.digest):
                raise HandoffError(f"leader serves plan {served.version}, not this one")
            result = HandoffResult(served.version, None)
    except HandoffError as error:
        outcome.handoff_problem = str(error)
        logger.warning("plan %d not handed off yet: %s", desired.version, error)
        # A refusal of the plan itself is news once (the status keeps saying it); a leader
        # that cannot be reached is retried quietly.
        refusal = str(error) if isinstance(error, PlanRefused) else None
        if refusal is not None and window.last_refusal != refusal:
            outcome.events.append(("Warning", "PlanRefused", refusal))
        window.last_refusal = refusal
        return
    outcome.ledger = outcome.ledger.serving(result.applied_version)
    if result.pause_seconds is not None:
        outcome.events.append(
            (
                "Normal",
                "PlanApplied",
                f"workers serve plan {result.applied_version}; serving paused "
                f"{result.pause_seconds * 1000:.0f} ms for the switch",
            )
        )


def rebalanced_message(record: RebalanceRecord) -> str:
    """The Rebalanced Event's message, from the record alone (status keeps it, and so does the
    ConfigMap): the same whether the operator that issued the plan sees it served or another
    one, after a restart, does."""
    after = "not predicted" if record.method == GATING_BIAS else f"{record.imbalance_after:.2f}"
    pods = ""
    if record.cross_pod_before is not None and record.cross_pod_after is not None:
        pods = (
            f", cross-pod {record.cross_pod_before:.1%} -> {record.cross_pod_after:.1%} of "
            "assignments"
        )
    return (
        f"plan {record.to_version}: imbalance {record.imbalance_before:.2f} -> {after}, "
        f"{record.slots_moved} slots moved{pods} ({record.method}): {record.note}; predicted "
        f"throughput x{record.predicted_throughput_gain:.2f}, weight move "
        f"~{record.estimated_move_seconds:.2f}s"
    )


def rebalanced_events(
    applied_before: int, applied_after: int, record: RebalanceRecord | None
) -> list[tuple[str, str, str]]:
    """The Rebalanced Event, once: when the leader is first seen serving the rebalance's plan.
    Posting it when the plan was issued lost it whenever the operator died between writing the
    plan and handing it over (status kept the record; the Event never came)."""
    if record is None or not applied_before < record.to_version <= applied_after:
        return []
    return [("Normal", "Rebalanced", rebalanced_message(record))]


def control_step(
    spec: MoEDeploymentSpec,
    desired: Plan,
    ledger: Ledger,
    state: detection.DetectionState,
    window: Window,
    workers: Workers,
    store: PlanStore,
    now: float,
    last_rebalance: RebalanceRecord | None = None,
) -> StepOutcome:
    """Everything the timer does for one ready deployment; never raises on worker trouble.

    Args:
        desired: the plan of the durable record (the ConfigMap's).
        ledger: the versions status remembers; `desired` counts as issued even when the status
            that says so was lost (the operator died between writing it and patching status).
        last_rebalance: the last rebalance status (or the ConfigMap) records: its Rebalanced
            Event is posted when the leader is first seen serving its plan.
    """
    outcome = _step(spec, desired, ledger, state, window, workers, store, now)
    record = outcome.rebalance or last_rebalance
    outcome.events += rebalanced_events(ledger.applied, outcome.ledger.applied, record)
    return outcome


def _step(
    spec: MoEDeploymentSpec,
    desired: Plan,
    ledger: Ledger,
    state: detection.DetectionState,
    window: Window,
    workers: Workers,
    store: PlanStore,
    now: float,
) -> StepOutcome:
    events: list[tuple[str, str, str]] = []
    ledger = ledger.recorded(desired)
    in_contact, handoff_problem = True, None
    try:
        served = workers.serving()
        if ledger.foreign(served.version, served.digest):
            desired, ledger = _reissue(desired, ledger, served, store, now, events)
        ledger = ledger.serving(served.version)
    except (HandoffError, PlanStoreConflict) as error:  # unreachable, or serves no plan of ours
        in_contact, handoff_problem = False, str(error)
    outcome = StepOutcome(
        desired=desired,
        ledger=ledger,
        in_contact=in_contact,
        state=state,
        layer_imbalance=window.last_layer_imbalance,
        handoff_problem=handoff_problem,
        events=events,
    )
    _hand_off(workers, desired, outcome, window)
    rebalancing = spec.rebalancing
    if now - window.started_at < rebalancing.evaluation_window_seconds:
        outcome.loads_problem = window.last_loads_problem  # between two reads, the last stands
        return outcome
    try:
        snapshot = workers.read_counters()
    except LoadReadError as error:
        outcome.loads_problem = window.last_loads_problem = str(error)
        outcome.skipped = "unreadable"
        outcome.state, _ = detection.evaluate(
            outcome.state,
            detection.Observation(ledger=outcome.ledger, skip_reason=str(error)),
            now,
            detection_policy(spec),
        )
        return outcome
    previous, window.snapshot, window.started_at = window.snapshot, snapshot, now
    if previous is None:
        window.last_loads_problem = None
        return outcome  # the first snapshot only opens a window
    _evaluate(spec, previous, snapshot, window, workers, store, now, outcome)
    return outcome


def detection_policy(spec: MoEDeploymentSpec) -> detection.DetectionPolicy:
    """The spec's rebalancing settings as detection's policy (whose defaults the API's are)."""
    rebalancing = spec.rebalancing
    return detection.DetectionPolicy(
        threshold=rebalancing.imbalance_threshold,
        consecutive=rebalancing.consecutive_evaluations,
        cooldown_seconds=rebalancing.cooldown_seconds,
    )


def gating_options(spec: MoEDeploymentSpec) -> GatingOptions:
    """The spec's rebalancing.gating as the planner's options (whose defaults the API's are)."""
    gating = spec.rebalancing.gating
    return GatingOptions(
        rate=gating.rate,
        max_bias=gating.max_bias,
        damping=gating.damping,
        max_margin=gating.max_margin,
        max_rerouted_fraction=gating.max_rerouted_fraction,
    )


def _reissue(
    desired: Plan,
    ledger: Ledger,
    served: Served,
    store: PlanStore,
    now: float,
    events: list[tuple[str, str, str]],
) -> tuple[Plan, Ledger]:
    """The leader serves a plan the operator did not issue (its version, or a newer one, with
    other contents): issue the desired plan again above it, durable first."""
    try:
        again, ledger = ledger.issue(desired, above=served.version)
    except NoVersionLeft:
        raise PlanStoreConflict(
            f"leader serves plan {served.version}: no version left above it"
        ) from None
    store.write(again, None, now)
    events.append(
        (
            "Warning",
            "ForeignPlan",
            f"the leader serves plan {served.version} with digest {served.digest[:12]}, which "
            f"the operator did not issue; issued the desired plan again as {again.version}",
        )
    )
    return again, ledger


def _bias_upkeep(
    spec: MoEDeploymentSpec,
    outcome: StepOutcome,
    decision: detection.Decision,
    fractions: tuple[float | None, ...],
    now: float,
) -> bool:
    """Whether a gate bias the workers serve needs an update although detection holds: its
    measured price is above the cap (shrink it now, cooldown or not), or the load is balanced
    and the cooldown over (the damped rule lets an unneeded bias decay, so routing returns to
    the model's own). Above the threshold detection's own rules (consecutive evaluations,
    cooldown) decide, as for any rebalance."""
    state, gating = outcome.state, spec.rebalancing.gating
    if outcome.desired.gate_bias is None or outcome.ledger.in_flight:
        return False
    if decision.action != detection.Action.HOLD:
        return False
    if over_cap(fractions, gating.max_rerouted_fraction):
        return True
    worst = decision.worst_imbalance
    if worst is None or worst > spec.rebalancing.imbalance_threshold:
        return False
    last = state.last_rebalance_at
    return last is None or now - last >= spec.rebalancing.cooldown_seconds


def _evaluate(
    spec: MoEDeploymentSpec,
    previous: CounterSnapshot,
    current: CounterSnapshot,
    window: Window,
    workers: Workers,
    store: PlanStore,
    now: float,
    outcome: StepOutcome,
) -> None:
    model = spec.model
    loads = detection.counter_deltas(
        _by_source(previous),
        _by_source(current),
        num_layers=model.layers,
        num_experts=model.experts_per_layer,
        expected_sources=[f"rank-{rank}" for rank in range(spec.parallelism.world_size)],
    )
    layer_imbalance = rank_layer_imbalance(previous, current, model.layers) if loads.usable else ()
    fractions = rerouted_fractions(previous, current, model.layers) if loads.usable else ()
    if loads.usable:
        window.last_layer_imbalance = outcome.layer_imbalance = layer_imbalance
        window.last_rerouted_fraction = outcome.rerouted_fraction = fractions
    outcome.loads_problem = window.last_loads_problem = loads.skip_reason
    if loads.skip_reason is not None:
        outcome.skipped = "unusable"
    observation = detection.Observation(
        layer_imbalance=layer_imbalance, ledger=outcome.ledger, skip_reason=loads.skip_reason
    )
    policy = detection_policy(spec)
    outcome.state, decision = detection.evaluate(outcome.state, observation, now, policy)
    if not spec.rebalancing.enabled:
        return
    upkeep = _bias_upkeep(spec, outcome, decision, fractions, now)
    if decision.action != detection.Action.REBALANCE and not upkeep:
        return
    assert loads.expert_load is not None
    result = plan_rebalance(
        loads.expert_load,
        world_size=spec.parallelism.world_size,
        slots_per_rank=spec.placement.slots_per_rank,
        max_slots_per_rank=spec.placement.most_slots_per_rank,
        previous=outcome.desired,
        method=spec.rebalancing.method,
        gating_options=gating_options(spec),
        rerouted_fraction=list(fractions) or None,
        ranks_per_pod=spec.worker.local_ranks(),
    )
    if not result.changed:
        if not upkeep:  # upkeep that changes nothing is no news
            outcome.events.append(("Normal", "RebalanceNotWorthIt", result.summary()))
        return
    try:
        new_plan, ledger = outcome.ledger.issue(result.plan)
    except NoVersionLeft as error:
        outcome.events.append(("Warning", "NoVersionLeft", f"plan versions end at {error.last}"))
        return
    gain, move = predicted_effect(
        spec,
        result.imbalance_before,
        result.imbalance_after,
        result.slots_moved,
        (result.cross_pod_before, result.cross_pod_after),
    )
    record = RebalanceRecord(
        time=_iso(now),
        method=result.method,
        from_version=outcome.desired.version,
        to_version=new_plan.version,
        imbalance_before=round(result.imbalance_before, 4),
        imbalance_after=round(result.imbalance_after, 4),
        slots_moved=result.slots_moved,
        predicted_throughput_gain=round(gain, 4),
        estimated_move_seconds=round(move, 4),
        note=result.note,
        cross_pod_before=_fraction(result.cross_pod_before),
        cross_pod_after=_fraction(result.cross_pod_after),
    )
    try:
        store.write(new_plan, record, now)  # durable first: a restart re-sends it, never loses it
    except PlanStoreConflict as error:
        outcome.events.append(("Warning", "PlanConflict", f"{error}; deciding again next step"))
        return
    outcome.desired, outcome.ledger, outcome.rebalance = new_plan, ledger, record
    outcome.state = detection.plan_issued(outcome.state, now)
    cap = spec.rebalancing.gating.max_rerouted_fraction
    capped = over_cap(fractions, cap) if new_plan.gate_bias is not None else []
    if capped:
        worst = max(f for _, f in capped)
        outcome.events.append(
            (
                "Normal",
                "GateBiasCapped",
                f"the gate bias rerouted up to {worst:.3f} of top-K assignments on layers "
                f"{[layer for layer, _ in capped][:8]}, above rebalancing.gating."
                f"maxReroutedFraction {cap:g}: their bias shrunk in plan {new_plan.version}",
            )
        )
    _hand_off(workers, new_plan, outcome, window)  # Rebalanced is posted once it is served
