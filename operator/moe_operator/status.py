"""Pure status computation: what the operator observed -> a MoEDeployment's status.

All of a MoEDeployment's status logic lives here, so it is tested without any server. Status is
built as the API's own models (`api.MoEDeploymentStatus` and its parts, which the CRD's schema
is generated from), so a status the API server would refuse fails here, naming the field; the
patch sent is their camelCase dump of what this run sets (`status_patch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moe_contract.elastic import redundancy
from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator.api import (
    ApiModel,
    Condition,
    DetectionStatus,
    MembershipStatus,
    MoEDeploymentStatus,
    Phase,
    PlanStatus,
    RebalanceRecord,
    RecoveryStatus,
    RedundancyStatus,
    RefusalStatus,
    ReplicaGroupStatus,
    ReroutedStatus,
)
from moe_operator.failures import StartupFailure
from moe_operator.group import RECOVERING_REASON as RECOVERING
from moe_operator.group import ReplacementBackoff
from moe_operator.planning.detection import DetectionPolicy, DetectionState
from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.ledger import LEGACY_DETECTION_FIELDS, Ledger
from moe_operator.rankloss import RankLoss


@dataclass(frozen=True)
class Observed:
    """Everything the status depends on, gathered by the handlers."""

    generation: int
    workers: int
    spec_problems: tuple[str, ...] = ()
    statefulset_exists: bool = False
    ready_workers: int = 0
    rollout_in_progress: bool = False
    plan: PlanStatus | None = None  # the desired and the applied plan; None: not known here
    worst_imbalance: float | None = None  # None: not measured yet
    rerouted_fraction: tuple[float | None, ...] = ()  # per layer; None: not measured there
    max_rerouted_fraction: float | None = GatingOptions.max_rerouted_fraction
    gate_bias_active: bool = False  # the desired plan carries a gate bias
    imbalance_threshold: float = DetectionPolicy.threshold
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
    detection: DetectionState | None = None  # what detection remembers
    last_rebalance: RebalanceRecord | None = None
    recovery: ReplacementBackoff | None = None  # whole-group replacements in a row
    replicas: int | None = None  # replica groups that exist (None: not known here)
    ready_replicas: int = 0  # groups whose whole gang serves
    label_selector: str = ""  # the worker pods' selector (the scale subresource's)
    groups: tuple[ReplicaGroupStatus, ...] = ()
    refusal: dict[str, Any] | None = None  # the held start-up refusal (status.refusal)
    rank_loss: RankLoss | None = None  # the group serves without some of its ranks
    membership: GroupStatus | None = None  # the leader's, this run (None: not known)
    redundancy: RedundancyStatus | None = None  # of the plan of record


def _phase(observed: Observed) -> Phase:
    if observed.spec_problems or observed.conflicts:
        return "Failed"
    if observed.startup_failure is not None and observed.group_restart is None:
        return "Failed"  # restarting fails the same way: the spec or the checkpoint must change
    if not observed.statefulset_exists:
        return "Pending"
    if observed.recovering is not None or observed.rank_loss is not None:
        return "Degraded"
    if observed.group_restart is not None:
        return "Deploying"
    if observed.ready_workers < observed.workers:
        if observed.rollout_in_progress or not observed.was_running:
            return "Deploying"
        return "Degraded"
    plan = observed.plan or PlanStatus()
    if plan.version > plan.applied_version:
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
    if observed.rank_loss is not None and restart is None:
        loss = observed.rank_loss
        return [
            _condition("SpecValid", True, "Valid", "spec passed every rule"),
            _condition(
                "ChildrenOwned", True, "Owned", "every child is controlled by this deployment"
            ),
            _condition("Ready", True, loss.reason, f"{ready}; serving: {loss.message}"),
            _condition("Progressing", True, loss.reason, f"{ready}; the group grows back"),
            _condition("Degraded", True, loss.reason, loss.message),
            reconciled,
        ]
    plan = observed.plan or PlanStatus()
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
            f"{restart}; " * bool(restart) + f"plan {plan.applied_version} applied, "
            f"{plan.version} desired; {ready}{handoff}",
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


def rerouted_summary(observed: Observed) -> ReroutedStatus | None:
    """status.reroutedFraction: max and mean over the measured layers, each layer (-1: not
    measured); None before any layer was measured."""
    measured = [f for f in observed.rerouted_fraction if f is not None]
    if not measured:
        return None
    cap = observed.max_rerouted_fraction
    return ReroutedStatus(
        max=round(max(measured), 4),
        mean=round(sum(measured) / len(measured), 4),
        per_layer=[-1.0 if f is None else round(f, 4) for f in observed.rerouted_fraction],
        cap=1.0 if cap is None else cap,
    )


def _price_note(observed: Observed) -> str:
    """What the gate bias costs, for the Balanced condition while one is served."""
    summary = rerouted_summary(observed)
    if not observed.gate_bias_active or summary is None:
        return ""
    return (
        f"; it rerouted {summary.max:.3f} of top-K assignments on the worst layer, "
        f"{summary.mean:.3f} on average (cap {summary.cap:g})"
    )


def _reconciled(observed: Observed) -> tuple[str, str, str, str]:
    if observed.reconcile_error:
        return _condition("Reconciled", False, "ReconcileError", observed.reconcile_error)
    return _condition("Reconciled", True, "Reconciled", "the last handler run succeeded")


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[tuple[str, str, str, str]],
    *,
    generation: int,
    now: str,
) -> list[Condition]:
    """Keep lastTransitionTime of conditions whose status did not change (Kubernetes convention)."""
    before = {item.get("type"): item for item in previous}
    merged = []
    for kind, status, reason, message in current:
        old = before.get(kind, {})
        changed = old.get("status") != status
        merged.append(
            Condition(
                type=kind,
                status=status,  # type: ignore[arg-type]  # "True" | "False" | "Unknown"
                reason=reason,
                message=message,
                last_transition_time=now if changed else old.get("lastTransitionTime", now),
                observed_generation=generation,
            )
        )
    return merged


def plan_status(ledger: Ledger, method: str, config_map: str, key: str) -> PlanStatus:
    """status.plan: the one copy of the plan versions (the ledger's), and where the plan is."""
    return PlanStatus(
        version=ledger.desired,
        applied_version=ledger.applied,
        digest=ledger.digest,
        method=method,
        config_map=config_map,
        config_map_key=key,
    )


def detection_status(state: DetectionState) -> DetectionStatus:
    """status.detection; the version copies an older operator kept there are removed."""
    legacy: dict[str, Any] = {field: None for field in LEGACY_DETECTION_FIELDS}
    return DetectionStatus.model_validate(
        {"aboveCount": state.above_count, "lastRebalanceAt": state.last_rebalance_at, **legacy}
    )


def recovery_status(backoff: ReplacementBackoff) -> RecoveryStatus:
    return RecoveryStatus(replacements=backoff.replacements, last_replaced_at=backoff.last_at)


def read_rebalance_record(data: Any) -> RebalanceRecord | None:
    """A last-rebalance record read back (status, or the ConfigMap's annotation); None when it
    is not one (someone edited it): it is then left as it stands, never rewritten wrong."""
    if isinstance(data, RebalanceRecord) or data is None:
        return data
    try:
        return RebalanceRecord.model_validate(data)
    except ValidationError:
        return None


def build_status(
    observed: Observed, previous_conditions: Sequence[Mapping[str, Any]], now: str
) -> MoEDeploymentStatus:
    """The status fields this run knows, as the API's model (unset fields are left alone)."""
    phase = _phase(observed)
    # "-" rather than "": kopf sends an empty string as null, which the schema refuses.
    imbalance = "-" if observed.worst_imbalance is None else f"{observed.worst_imbalance:.2f}"
    conditions = merge_conditions(
        previous_conditions, _conditions(observed, phase), generation=observed.generation, now=now
    )
    fields: dict[str, Any] = {
        "observed_generation": observed.generation,
        "phase": phase,
        "workers": observed.workers,
        "ready_workers": observed.ready_workers,
        "ready": f"{observed.ready_workers}/{observed.workers}",
        "imbalance": imbalance,
        "conditions": conditions,
    }
    rerouted = rerouted_summary(observed)
    if rerouted is not None:
        fields["rerouted_fraction"] = rerouted
    if observed.endpoint:  # only where the children exist ("" would be sent as null)
        fields["endpoint"] = observed.endpoint
        fields["served_model_name"] = observed.served_model_name
    if observed.plan is not None:
        fields["plan"] = observed.plan
    if observed.detection is not None:
        fields["detection"] = detection_status(observed.detection)
    if observed.last_rebalance is not None:
        fields["last_rebalance"] = observed.last_rebalance
    if observed.recovery is not None and observed.recovery.replacements:
        fields["recovery"] = recovery_status(observed.recovery)
    if observed.replicas is not None:
        fields["replicas"] = observed.replicas
        fields["ready_replicas"] = observed.ready_replicas
        fields["groups"] = list(observed.groups)
    if observed.label_selector:
        fields["label_selector"] = observed.label_selector
    if observed.statefulset_exists:  # None removes a refusal the spec has moved past
        refusal = observed.refusal
        fields["refusal"] = None if refusal is None else RefusalStatus.model_validate(refusal)
    if observed.membership is not None:
        fields["membership"] = membership_status(observed.membership)
    if observed.redundancy is not None:
        fields["redundancy"] = observed.redundancy
    return MoEDeploymentStatus(**fields)


def membership_status(group: GroupStatus) -> MembershipStatus:
    """status.membership from the leader's GET /v1/group."""
    return MembershipStatus(
        epoch=group.epoch,
        ranks=group.world,
        live_ranks=list(group.live),
        lost_ranks=list(group.lost),
        joining_ranks=list(group.joining),
        state=group.state,
        resumed_requests=group.resumed_requests,
    )


def plan_redundancy(plan: Plan, ranks_per_pod: int) -> RedundancyStatus:
    """status.redundancy: how the plan of record takes a rank's or a pod's loss (the pods of
    the deployment are the failure domains)."""
    found = redundancy(plan.model_copy(update={"ranks_per_pod": ranks_per_pod}))
    return RedundancyStatus(
        single_replica_experts=found.worst_single_replica,
        single_pod_experts=found.worst_single_domain,
        survives_pod_loss=found.survives_domain_loss,
    )


def status_patch(status: ApiModel) -> dict[str, Any]:
    """The merge patch of the status (or of a part): the fields set, camelCase (None removes).

    No empty string is sent: the API server reads one in a status merge patch as null, which
    the schema refuses, failing the whole write (observed on the tests' 1.20 API server); an
    empty string is removed instead. Inside a list, which a merge patch replaces whole, a None
    or "" removes nothing: the key is left out."""
    patch = status.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return _as_sent(patch, in_list=False)


def _as_sent(value: Any, *, in_list: bool) -> Any:
    if isinstance(value, list):
        return [_as_sent(item, in_list=True) for item in value]
    if isinstance(value, dict):
        return {
            key: _as_sent(item, in_list=in_list)
            for key, item in value.items()
            if not (in_list and item in (None, ""))
        }
    return None if value == "" else value


def compute_status(
    observed: Observed, previous_conditions: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any]:
    """The status patch of one run: `build_status`, as sent."""
    return status_patch(build_status(observed, previous_conditions, now))


def reconcile_error_status(
    previous_conditions: Sequence[Mapping[str, Any]], error: str, generation: int, now: str
) -> dict[str, Any]:
    """The patch of a failed handler run: the conditions as they were, with Reconciled False
    saying why."""
    kept = [
        (item["type"], item["status"], item.get("reason", ""), item.get("message", ""))
        for item in previous_conditions
        if item.get("type") != "Reconciled"
    ]
    current = [*kept, _condition("Reconciled", False, "ReconcileError", error)]
    conditions = merge_conditions(previous_conditions, current, generation=generation, now=now)
    return status_patch(MoEDeploymentStatus(conditions=conditions))
