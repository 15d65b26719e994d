"""One reconciliation of a MoEDeployment's children: decide with pure code, then apply.

Called from the kopf handlers (create, update, resume and the periodic timer). Children are
created when missing and patched back into shape; the control-token Secret is created once and
never rewritten; the plan ConfigMap is replaced only when the spec's shape invalidates the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_operator.api import MoEDeploymentSpec
from moe_operator.kube import Cluster
from moe_operator.manifests import children
from moe_worker.plan import (
    PLAN_FILE_NAME,
    Plan,
    PlanError,
    parse_plan,
    round_robin_plan,
    validate_plan,
)

Adopt = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ChildrenState:
    """What the status needs from the children after a reconciliation."""

    statefulset: dict[str, Any]
    plan: Plan
    changes: tuple[str, ...]  # human-readable, for Events


def initial_plan(spec: MoEDeploymentSpec, version: int = 1) -> Plan:
    """The seed's round-robin placement; the rebalancer re-places experts from measured load."""
    return round_robin_plan(
        spec.model.layers,
        spec.model.experts_per_layer,
        spec.parallelism.world_size,
        spec.placement.slots_per_rank,
        version=version,
    )


def plan_from_configmap(configmap: dict[str, Any] | None) -> Plan | None:
    if not configmap:
        return None
    try:
        return parse_plan((configmap.get("data") or {}).get(PLAN_FILE_NAME, ""))
    except PlanError:
        return None


def plan_fits(plan: Plan, spec: MoEDeploymentSpec) -> bool:
    """Whether `plan` fits the spec: slots per rank may have grown up to maxSlotsPerRank."""
    try:
        validate_plan(
            plan,
            num_layers=spec.model.layers,
            num_experts=spec.model.experts_per_layer,
            world_size=spec.parallelism.world_size,
            max_slots_per_rank=spec.placement.most_slots_per_rank,
        )
    except PlanError:
        return False
    return plan.slots_per_rank >= spec.placement.slots_per_rank


def plan_for_spec(current: Plan | None, spec: MoEDeploymentSpec) -> Plan | None:
    """The plan to write, or None to keep the current one (it still fits the spec)."""
    if current is None:
        return initial_plan(spec)
    if plan_fits(current, spec):
        return None
    return initial_plan(spec, version=current.version + 1)  # versions never go back


def ensure_children(
    cluster: Cluster, name: str, namespace: str, spec: MoEDeploymentSpec, adopt: Adopt
) -> ChildrenState:
    changes: list[str] = []

    def apply(
        body: dict[str, Any], how: Callable[..., tuple[str, dict[str, Any]]]
    ) -> dict[str, Any]:
        adopt(body)
        outcome, stored = how(namespace, body)
        if outcome != "unchanged":
            changes.append(f"{body['kind']} {body['metadata']['name']} {outcome}")
        return stored

    apply(children.build_token_secret(name), cluster.create_if_missing)
    configmap = cluster.get("ConfigMap", namespace, children.plan_configmap_name(name))
    current_plan = plan_from_configmap(configmap)
    new_plan = plan_for_spec(current_plan, spec)
    if new_plan is not None:
        apply(children.build_plan_configmap(name, new_plan), cluster.create_or_patch)
    plan = new_plan or current_plan
    assert plan is not None
    apply(children.build_service(name, spec), cluster.create_or_patch)
    statefulset = apply(children.build_statefulset(name, namespace, spec), cluster.create_or_patch)
    return ChildrenState(statefulset=statefulset, plan=plan, changes=tuple(changes))


def write_plan(cluster: Cluster, name: str, namespace: str, plan: Plan, adopt: Adopt) -> None:
    body = children.build_plan_configmap(name, plan)
    adopt(body)
    cluster.create_or_patch(namespace, body)


def rollout_in_progress(statefulset: dict[str, Any]) -> bool:
    status = statefulset.get("status") or {}
    spec_replicas = (statefulset.get("spec") or {}).get("replicas", 0)
    if status.get("observedGeneration", 0) < (statefulset.get("metadata") or {}).get(
        "generation", 0
    ):
        return True
    if status.get("updateRevision") and status.get("currentRevision") != status.get(
        "updateRevision"
    ):
        return True
    return status.get("updatedReplicas", spec_replicas) < spec_replicas


def ready_replicas(statefulset: dict[str, Any]) -> int:
    return int((statefulset.get("status") or {}).get("readyReplicas") or 0)
