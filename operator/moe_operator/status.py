"""Pure status computation: what the operator observed -> phase and standard conditions.

All of a MoEDeployment's status logic lives here, so it is tested without any server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_operator.api import Condition, Phase
from moe_operator.failures import StartupFailure
from moe_operator.group import RECOVERING_REASON as RECOVERING


@dataclass(frozen=True)
class Observed:
    """Everything the status depends on, gathered by the handlers."""

    generation: int
    workers: int
    spec_problems: tuple[str, ...] = ()
    statefulset_exists: bool = False
    ready_workers: int = 0
    rollout_in_progress: bool = False
    plan_version: int = 0
    applied_plan_version: int = 0
    worst_imbalance: float | None = None  # None: not measured yet
    rerouted_fraction: tuple[float | None, ...] = ()  # per layer; None: not measured there
    max_rerouted_fraction: float = 0.1  # rebalancing.gating.maxReroutedFraction
    gate_bias_active: bool = False  # the desired plan carries a gate bias
    imbalance_threshold: float = 1.25
    loads_problem: str | None = None  # why the last evaluation was skipped, if it was
    handoff_problem: str | None = None  # why the desired plan has not reached the workers yet
    was_running: bool = False  # the deployment has been fully ready before
    balance_note: str = ""
    conflicts: tuple[str, ...] = ()  # objects under our children's names we do not control
    group_restart: str | None = None  # the whole group is being replaced: what is happening
    recovering: str | None = None  # a rank failed; the group is brought back whole: which
    reconcile_error: str | None = None  # the last handler run failed: why
    startup_failure: StartupFailure | None = None  # workers refused to start: why
    endpoint: str = ""  # the OpenAI-compatible API's base URL
    served_model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _phase(observed: Observed) -> Phase:
    if observed.spec_problems or observed.conflicts:
        return "Failed"
    if observed.startup_failure is not None and observed.group_restart is None:
        return "Failed"  # restarting fails the same way: the spec or the checkpoint must change
    if not observed.statefulset_exists:
        return "Pending"
    if observed.recovering is not None:
        return "Degraded"
    if observed.group_restart is not None:
        return "Deploying"
    if observed.ready_workers < observed.workers:
        if observed.rollout_in_progress or not observed.was_running:
            return "Deploying"
        return "Degraded"
    if observed.plan_version > observed.applied_plan_version:
        return "Rebalancing"
    return "Running"


def _condition(kind: str, ok: bool | None, reason: str, message: str) -> tuple[str, str, str, str]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return kind, status, reason, message


def _conditions(observed: Observed, phase: Phase) -> list[tuple[str, str, str, str]]:
    reconciled = _reconciled(observed)
    if observed.spec_problems:
        problems = "; ".join(observed.spec_problems)
        return [
            _condition("SpecValid", False, "InvalidSpec", problems),
            _condition("Ready", False, "InvalidSpec", "fix the spec; no workers are managed"),
            _condition("Progressing", False, "InvalidSpec", "waiting for a valid spec"),
            reconciled,
        ]
    ready = f"{observed.ready_workers}/{observed.workers} workers ready"
    if observed.conflicts:
        conflicts = "; ".join(observed.conflicts)
        return [
            _condition("SpecValid", True, "Valid", "spec passed every rule"),
            _condition("ChildrenOwned", False, "ChildConflict", conflicts),
            _condition(
                "Ready", False, "ChildConflict", f"held until the conflict is resolved; {ready}"
            ),
            _condition("Progressing", False, "ChildConflict", "no child is created or changed"),
            reconciled,
        ]
    handoff = f"; hand-off failed: {observed.handoff_problem}" if observed.handoff_problem else ""
    serving = phase in ("Running", "Rebalancing")
    restart = observed.group_restart
    short = observed.was_running and not serving
    failure = observed.startup_failure if restart is None else None
    if failure is not None:
        refusal = failure.describe(observed.workers)
        owned = "every child is controlled by this deployment"
        waiting = "waiting for a spec or a checkpoint the workers accept"
        return [
            _condition("SpecValid", True, "Valid", "spec passed every rule"),
            _condition("ChildrenOwned", True, "Owned", owned),
            _condition("Ready", False, failure.reason, f"{ready}; {refusal}"),
            _condition("Progressing", False, failure.reason, waiting),
            _condition("Degraded", short, failure.reason if short else "AsExpected", refusal),
            reconciled,
        ]
    if observed.recovering is not None:
        return [
            _condition("SpecValid", True, "Valid", "spec passed every rule"),
            _condition(
                "ChildrenOwned", True, "Owned", "every child is controlled by this deployment"
            ),
            _condition("Ready", False, RECOVERING, f"{ready}; {observed.recovering}"),
            _condition("Progressing", True, RECOVERING, f"{ready}; the group forms again"),
            _condition("Degraded", True, RECOVERING, observed.recovering),
            reconciled,
        ]
    conditions = [
        _condition("SpecValid", True, "Valid", "spec passed every rule"),
        _condition("ChildrenOwned", True, "Owned", "every child is controlled by this deployment"),
        _condition(
            "Ready",
            serving,
            "AllWorkersReady" if serving else ("GroupRestart" if restart else "WorkersNotReady"),
            f"{ready}; {restart}" if restart else ready,
        ),
        _condition(
            "Progressing",
            phase in ("Pending", "Deploying", "Rebalancing"),
            "GroupRestart"
            if restart
            else {
                "Pending": "Creating",
                "Deploying": "RollingOut",
                "Rebalancing": "ApplyingPlan",
            }.get(phase, "Stable"),
            f"{restart}; " * bool(restart) + f"plan {observed.applied_plan_version} applied, "
            f"{observed.plan_version} desired; {ready}{handoff}",
        ),
        _condition(
            "Degraded",
            short,
            ("GroupRestart" if restart else "WorkersLost") if short else "AsExpected",
            f"not serving: {ready}" if short else ready,
        ),
        reconciled,
    ]
    if observed.loads_problem:
        conditions.append(
            _condition("LoadsRead", False, "EvaluationSkipped", observed.loads_problem)
        )
    elif observed.worst_imbalance is not None:
        conditions.append(_condition("LoadsRead", True, "Read", "token counters read"))
    if observed.worst_imbalance is None:
        conditions.append(
            _condition("Balanced", None, "NotMeasured", "no full evaluation window yet")
        )
    else:
        balanced = observed.worst_imbalance <= observed.imbalance_threshold
        conditions.append(
            _condition(
                "Balanced",
                balanced,
                "WithinThreshold" if balanced else "AboveThreshold",
                f"worst layer imbalance {observed.worst_imbalance:.2f} "
                f"(threshold {observed.imbalance_threshold:.2f}){observed.balance_note}"
                f"{_price_note(observed)}",
            )
        )
    return conditions


def rerouted_summary(observed: Observed) -> dict[str, Any] | None:
    """status.reroutedFraction: max and mean over the measured layers, each layer (-1: not
    measured); None before any layer was measured."""
    measured = [f for f in observed.rerouted_fraction if f is not None]
    if not measured:
        return None
    return {
        "max": round(max(measured), 4),
        "mean": round(sum(measured) / len(measured), 4),
        "perLayer": [-1.0 if f is None else round(f, 4) for f in observed.rerouted_fraction],
        "cap": observed.max_rerouted_fraction,
    }


def _price_note(observed: Observed) -> str:
    """What the gate bias costs, for the Balanced condition while one is served."""
    summary = rerouted_summary(observed)
    if not observed.gate_bias_active or summary is None:
        return ""
    return (
        f"; it rerouted {summary['max']:.3f} of top-K assignments on the worst layer, "
        f"{summary['mean']:.3f} on average (cap {observed.max_rerouted_fraction:g})"
    )


def _reconciled(observed: Observed) -> tuple[str, str, str, str]:
    if observed.reconcile_error:
        return _condition("Reconciled", False, "ReconcileError", observed.reconcile_error)
    return _condition("Reconciled", True, "Reconciled", "the last handler run succeeded")


def merge_conditions(
    previous: Sequence[dict[str, Any]],
    current: Sequence[tuple[str, str, str, str]],
    *,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime of conditions whose status did not change (Kubernetes convention)."""
    before = {item.get("type"): item for item in previous}
    merged = []
    for kind, status, reason, message in current:
        old = before.get(kind, {})
        changed = old.get("status") != status
        merged.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now if changed else old.get("lastTransitionTime", now),
                observed_generation=generation,
            ).model_dump(by_alias=True)
        )
    return merged


def compute_status(
    observed: Observed, previous_conditions: Sequence[dict[str, Any]], now: str
) -> dict[str, Any]:
    """The status fields to patch (plan and lastRebalance are written by the rebalancer)."""
    phase = _phase(observed)
    # "-" rather than "": kopf sends an empty string as null, which the schema refuses.
    imbalance = "-" if observed.worst_imbalance is None else f"{observed.worst_imbalance:.2f}"
    status = {
        "observedGeneration": observed.generation,
        "phase": phase,
        "workers": observed.workers,
        "readyWorkers": observed.ready_workers,
        "ready": f"{observed.ready_workers}/{observed.workers}",
        "imbalance": imbalance,
        "conditions": merge_conditions(
            previous_conditions,
            _conditions(observed, phase),
            generation=observed.generation,
            now=now,
        ),
    }
    rerouted = rerouted_summary(observed)
    if rerouted is not None:
        status["reroutedFraction"] = rerouted
    if observed.endpoint:  # only where the children exist ("" would be sent as null)
        status["endpoint"] = observed.endpoint
        status["servedModelName"] = observed.served_model_name
    return status


def with_reconcile_error(
    previous_conditions: Sequence[dict[str, Any]], error: str, generation: int, now: str
) -> list[dict[str, Any]]:
    """The conditions as they were, with Reconciled False saying why the handler failed."""
    kept = [
        (item["type"], item["status"], item.get("reason", ""), item.get("message", ""))
        for item in previous_conditions
        if item.get("type") != "Reconciled"
    ]
    current = [*kept, _condition("Reconciled", False, "ReconcileError", error)]
    return merge_conditions(previous_conditions, current, generation=generation, now=now)
