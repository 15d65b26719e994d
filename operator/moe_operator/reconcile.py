"""One reconciliation of a MoEDeployment's children: decide with pure code, then apply.

Called from the kopf handlers (create, update, resume and the periodic timer). Children are
created when missing and patched back into shape; an object under a child's name that this
deployment does not control is never patched, deleted or trusted (its data is not read): the
deployment is held and the conflict reported. The control-token Secret is created once and never
rewritten. The plan ConfigMap's key for the spec's shape is written only when the record must
change (new shape, lost or corrupted record: `planning.record.choose_plan`), always with a
resourceVersion precondition, and keys no pod maps any more are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_contract.plan import PLAN_FILE_NAME, Plan, PlanError, parse_plan
from moe_operator.api import MoEDeploymentSpec
from moe_operator.group import PodRef
from moe_operator.kube import Cluster, Conflict
from moe_operator.manifests import children, podspec, router
from moe_operator.planning.ledger import Ledger
from moe_operator.planning.record import PlanChoice, PlanShape, choose_plan

Adopt = Callable[[dict[str, Any]], None]
WRITE_ATTEMPTS = 3  # re-read and decide again after a lost race, then leave it to the next run


@dataclass(frozen=True)
class Owner:
    """The MoEDeployment its children belong to."""

    name: str
    namespace: str
    uid: str
    adopt: Adopt  # adds the controller reference (kopf.adopt), labels and namespace


@dataclass(frozen=True)
class ChildrenState:
    """What the handlers need from the children after a reconciliation."""

    statefulset: dict[str, Any] | None
    plan: Plan | None
    configmap: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)  # the StatefulSet's own pods
    conflicts: tuple[str, ...] = ()  # children under our names that we do not control
    changes: tuple[str, ...] = ()  # human-readable, for Events
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message): how the plan changed


def plan_from_configmap(configmap: Mapping[str, Any] | None, key: str) -> tuple[Plan | None, str]:
    """The plan under `key` (or the single-key layout's plan.json), and what is wrong if none."""
    data = (configmap or {}).get("data") or {}
    raw = data.get(key, data.get(PLAN_FILE_NAME))
    if configmap is None:
        return None, "missing"
    if raw is None:
        return None, f"has no key {key} (new model shape)"
    try:
        return parse_plan(raw), ""
    except PlanError as error:
        return None, f"holds an unreadable plan ({str(error)[:160]})"


def _other_versions(configmap: Mapping[str, Any] | None, key: str) -> Iterator[int]:
    for other, raw in ((configmap or {}).get("data") or {}).items():
        if other != key:
            try:
                yield parse_plan(raw).version
            except PlanError:
                continue


def keys_in_use(pods: list[dict[str, Any]]) -> set[str] | None:
    """ConfigMap keys the pods map onto their plan file; None: some pod mounts every key."""
    keys: set[str] = set()
    for pod in pods:
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            if volume.get("name") != "plan":
                continue
            items = (volume.get("configMap") or {}).get("items")
            if not items:
                return None
            keys.update(item["key"] for item in items)
    return keys


def conflicts_of(owner: Owner, found: Mapping[str, dict[str, Any] | None]) -> tuple[str, ...]:
    """Children that exist under our names without our controller reference, described with
    the fix (the operator never adopts or deletes them itself). `found`: "<Kind> <name>" ->
    the object under that name, or None."""
    return tuple(
        f"{what.split()[0]} {owner.namespace}/{obj['metadata']['name']} exists and is not "
        f"controlled by MoEDeployment {owner.name} (uid {owner.uid}); delete or rename it, or "
        f"give this deployment another name"
        for what, obj in found.items()
        if obj is not None and not children.controlled_by(obj, owner.uid)
    )


def owned_pods(
    cluster: Cluster, namespace: str, name: str, statefulset: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The StatefulSet's own pods: a pod someone else made with the same labels is ignored
    (never scraped, never sent the control token, never deleted)."""
    if statefulset is None:
        return []
    uid = statefulset["metadata"]["uid"]
    pods = cluster.list_pods(namespace, children.selector_labels(name))
    return [pod for pod in pods if children.controlled_by(pod, uid)]


def ensure_children(
    cluster: Cluster,
    owner: Owner,
    spec: MoEDeploymentSpec,
    ledger: Ledger,
    leader: Callable[[], Plan | None],
    pods: list[dict[str, Any]],
    router_image: str,
) -> ChildrenState:
    """Create or repair every child the groups share (the groups are `fleet`'s); never touch
    an object we do not control.

    Args:
        ledger: plan versions status remembers (a lost record never goes back past them).
        leader: the plan a group's rank 0 serves (asked only to repair the record).
        pods: every worker pod of the deployment (the plan keys they map are kept).
        router_image: the router's image when the spec names none.
    """
    name, namespace = owner.name, owner.namespace
    names = {
        "Secret": children.token_secret_name(name),
        "ConfigMap": children.plan_configmap_name(name),
        "Service": children.service_name(name),
        "Service api": children.api_service_name(name),
        "StatefulSet": name,  # group 0's (groups.naming)
        "PodDisruptionBudget": podspec.pdb_name(name),
    }
    found = {what: cluster.get(what.split()[0], namespace, child) for what, child in names.items()}
    conflicts = conflicts_of(owner, found)
    if conflicts:
        statefulset = found["StatefulSet"]
        ours = statefulset if children.controlled_by(statefulset, owner.uid) else None
        return ChildrenState(statefulset=ours, plan=None, conflicts=conflicts)
    changes: list[str] = []

    def apply(body: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
        owner.adopt(body)
        outcome, stored = cluster.ensure(namespace, body, current)
        if outcome != "unchanged":
            changes.append(f"{body['kind']} {body['metadata']['name']} {outcome}")
        return stored

    if found["Secret"] is None:
        apply(children.build_token_secret(name), None)
    configmap, choice, events = ensure_plan(
        cluster, owner, spec, ledger, leader, found["ConfigMap"]
    )
    if choice.write:
        changes.append(f"ConfigMap {children.plan_configmap_name(name)} plan {choice.plan.version}")
    configmap = prune_plan_keys(cluster, owner, spec, configmap, pods)
    apply(children.build_service(name, spec), found["Service"])
    available = ensure_router(cluster, owner, spec, router_image, apply)
    apply(children.build_api_service(name, spec, available), found["Service api"])
    return ChildrenState(
        statefulset=found["StatefulSet"],
        plan=choice.plan,
        configmap=configmap,
        pods=pods,
        changes=tuple(changes),
        events=events,
    )


def ensure_router(
    cluster: Cluster,
    owner: Owner,
    spec: MoEDeploymentSpec,
    image: str,
    apply: Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]],
) -> bool:
    """The router's objects (`manifests.router`), or their removal with router None; whether
    one of its pods is available (then `<name>-api` routes to it)."""
    name, namespace = owner.name, owner.namespace
    child = router.router_name(name)
    deployment = cluster.get("Deployment", namespace, child)
    pdb = cluster.get("PodDisruptionBudget", namespace, child)
    mine = [obj for obj in (deployment, pdb) if children.controlled_by(obj, owner.uid)]
    if spec.router.type == "None":
        for obj in mine:
            cluster.delete(obj["kind"], namespace, child, obj["metadata"]["uid"])
        return False
    for kind, body in (
        ("ServiceAccount", router.build_service_account(name)),
        ("Role", router.build_role(name)),
        ("RoleBinding", router.build_role_binding(name)),
    ):
        current = cluster.get(kind, namespace, child)
        if current is None or children.controlled_by(current, owner.uid):
            apply(body, current)
    if deployment is None or children.controlled_by(deployment, owner.uid):
        deployment = apply(router.build_deployment(name, namespace, spec, image), deployment)
    if pdb is None or children.controlled_by(pdb, owner.uid):
        apply(router.build_pdb(name, cluster.pdb_api_version()), pdb)
    available = int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0)
    return available > 0


def ensure_plan(
    cluster: Cluster,
    owner: Owner,
    spec: MoEDeploymentSpec,
    ledger: Ledger,
    leader: Callable[[], Plan | None],
    configmap: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, PlanChoice, tuple[tuple[str, str, str], ...]]:
    """Choose the plan for the spec's shape and write it if the record must change; after a
    lost race (someone wrote the ConfigMap meanwhile) read again and decide again. Returns the
    ConfigMap as stored, the choice, and the Event that says why the record changed."""
    shape = children.plan_shape(spec)
    for attempt in range(WRITE_ATTEMPTS):
        if attempt:
            name = children.plan_configmap_name(owner.name)
            configmap = cluster.get("ConfigMap", owner.namespace, name)
            if configmap is not None and not children.controlled_by(configmap, owner.uid):
                raise Conflict(f"ConfigMap {name} was replaced by one we do not control")
        stored, problem = plan_from_configmap(configmap, shape.key)
        choice = choose_plan(
            shape, stored, problem or None, ledger, leader, _other_versions(configmap, shape.key)
        )
        has_key = shape.key in ((configmap or {}).get("data") or {})
        if not choice.write and has_key:
            return configmap, choice, ()
        if not choice.write:  # kept from the single-key layout: copy it under its shape's key
            choice = PlanChoice(choice.plan, write=True, reason="")
        try:
            written = write_plan(cluster, owner, shape, choice.plan, configmap)
        except Conflict:
            continue
        return written, choice, _plan_events(choice, problem, ledger)
    name = children.plan_configmap_name(owner.name)
    raise Conflict(f"ConfigMap {name} keeps changing; deciding again next run")


def _plan_events(
    choice: PlanChoice, problem: str, ledger: Ledger
) -> tuple[tuple[str, str, str], ...]:
    if not choice.reason or (problem == "missing" and ledger.desired == 0):
        return ()  # a new deployment's first plan, or a copy under the shape's key
    if problem.startswith("has no key"):
        return (("Normal", "PlanForShape", choice.reason),)
    return (("Warning", "PlanRecovered", choice.reason),)


def write_plan(
    cluster: Cluster,
    owner: Owner,
    shape: PlanShape,
    plan: Plan,
    configmap: dict[str, Any] | None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write `plan` under its shape's key; the ConfigMap as read is the precondition (Conflict
    if it changed since). Returns the ConfigMap as stored."""
    notes = {children.PLAN_VERSION_ANNOTATION: str(plan.version), **(annotations or {})}
    body = children.build_plan_configmap(owner.name, {shape.key: plan}, notes)
    if configmap is None:
        owner.adopt(body)
        return cluster.create(owner.namespace, body)
    body["metadata"] = {
        "name": body["metadata"]["name"],
        "annotations": notes,
        "resourceVersion": configmap["metadata"]["resourceVersion"],
    }
    return cluster.patch(owner.namespace, body)


def prune_plan_keys(
    cluster: Cluster,
    owner: Owner,
    spec: MoEDeploymentSpec,
    configmap: dict[str, Any] | None,
    pods: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """Drop the plans of shapes no pod maps any more (a finished group restart's old shape)."""
    in_use = keys_in_use(pods)
    if configmap is None or in_use is None:
        return configmap
    keep = in_use | {children.plan_shape(spec).key}
    stale = [key for key in (configmap.get("data") or {}) if key not in keep]
    if not stale:
        return configmap
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap["metadata"]["name"],
            "resourceVersion": configmap["metadata"]["resourceVersion"],
        },
        "data": dict.fromkeys(stale),  # null removes a key in a merge patch
    }
    try:
        return cluster.patch(owner.namespace, body)
    except Conflict:
        return configmap  # someone wrote meanwhile: prune on a later run


def delete_pods(cluster: Cluster, namespace: str, pods: tuple[PodRef, ...]) -> int:
    """Delete pods together (uid preconditions); returns how many were still there."""
    return sum(cluster.delete_pod(namespace, pod.name, pod.uid) for pod in pods)


@dataclass(frozen=True)
class RecordNotes:
    """What the ConfigMap's annotations say about the plan under the current key."""

    version: int | None = None
    issued_at: float | None = None
    last_rebalance: dict[str, Any] | None = field(default=None)


def record_notes(configmap: Mapping[str, Any] | None) -> RecordNotes:
    """The annotations written with a rebalance's plan, as far as they parse."""
    annotations = ((configmap or {}).get("metadata") or {}).get("annotations") or {}
    try:
        version: int | None = int(annotations[children.PLAN_VERSION_ANNOTATION])
    except (KeyError, ValueError):
        version = None
    try:
        issued: float | None = float(annotations[children.ISSUED_AT_ANNOTATION])
    except (KeyError, ValueError):
        issued = None
    try:
        record = json.loads(annotations[children.LAST_REBALANCE_ANNOTATION])
    except (KeyError, ValueError):
        record = None
    return RecordNotes(version, issued, record if isinstance(record, dict) else None)


def hold_group(cluster: Cluster, namespace: str, statefulset: dict[str, Any]) -> None:
    """Scale the group to 0 pods: its workers refused to start, and restarting them (the
    kubelet's CrashLoopBackOff, or a replacement) fails the same way until the spec changes."""
    if (statefulset.get("spec") or {}).get("replicas") == 0:
        return
    name = statefulset["metadata"]["name"]
    body = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name}}
    cluster.patch(namespace, {**body, "spec": {"replicas": 0}})
