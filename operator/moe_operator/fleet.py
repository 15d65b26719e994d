"""The replica groups of one MoEDeployment in one run: read them, roll them out, label them.

A thin shell around the pure decisions (`groups.rollout.decide_rollout`, `recovery.decide` per
group): it reads the groups' StatefulSets (by label, our controller reference only) and pods,
applies what the decisions return (create, drain, remove, restart a group; replace a failed
group's pods) and keeps each pod's group, role and traffic labels, which the router selects by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moe_operator.api import MoEDeploymentSpec
from moe_operator.groups import naming
from moe_operator.groups.read import GroupRead
from moe_operator.groups.rollout import Drain, Group, Policy, Rollout, decide_rollout
from moe_operator.kube import Cluster, contains
from moe_operator.manifests import children, podspec
from moe_operator.reconcile import Owner
from moe_operator.workers import leader_in_flight

Announce = Callable[[list[tuple[str, str, str]]], None]


@dataclass
class Fleet:
    """The deployment's groups, lowest number first, and numbers still held by leftover pods."""

    groups: list[GroupRead]
    pods: list[dict[str, Any]]  # every worker pod of the deployment we control
    taken: frozenset[int] = frozenset()
    changes: list[str] = field(default_factory=list)

    def group(self, index: int) -> GroupRead | None:
        return next((g for g in self.groups if g.index == index), None)


def _owner_uid(obj: dict[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def read_fleet(cluster: Cluster, owner: Owner, spec: MoEDeploymentSpec) -> Fleet:
    name, namespace = owner.name, owner.namespace
    statefulsets = [
        sts
        for sts in cluster.list_statefulsets(namespace, {naming.DEPLOYMENT_LABEL: name})
        if children.controlled_by(sts, owner.uid)
        and naming.group_index(name, sts["metadata"]["name"]) is not None
    ]
    uids = {sts["metadata"]["uid"] for sts in statefulsets}
    pods = [
        pod
        for pod in cluster.list_pods(namespace, children.selector_labels(name))
        if _owner_uid(pod) in uids
        or (pod["metadata"].get("labels") or {}).get(naming.GROUP_LABEL) is not None
    ]
    groups = []
    for sts in statefulsets:
        index = naming.group_index(name, sts["metadata"]["name"])
        assert index is not None
        own = [pod for pod in pods if _owner_uid(pod) == sts["metadata"]["uid"]]
        wanted = children.build_statefulset(name, namespace, spec, index)
        annotations = sts["metadata"].get("annotations") or {}
        drain = Drain.parse(annotations.get(naming.DRAIN_ANNOTATION))
        # the pod count is no template change (a held refusal keeps current groups at 0 pods)
        wanted["spec"].pop("replicas", None)
        current = contains(sts, wanted)
        groups.append(GroupRead(index, sts, own, current, drain))
    groups.sort(key=lambda group: group.index)
    live = {group.index for group in groups}
    leftovers = {
        int(label)
        for pod in pods
        if (label := (pod["metadata"].get("labels") or {}).get(naming.GROUP_LABEL, "")).isdigit()
    }
    owned = [pod for pod in pods if _owner_uid(pod) in uids]
    return Fleet(groups, owned, frozenset(leftovers - live))


def policy_of(spec: MoEDeploymentSpec) -> Policy:
    strategy = spec.update_strategy
    return Policy(
        replicas=spec.replicas,
        max_surge=strategy.max_surge,
        max_unavailable=strategy.max_unavailable,
        # the pods' terminationGracePeriodSeconds: how long a drain may take (the worker's own
        # drain timeout and a margin); the operator waits as long for a drained group to go idle
        drain_timeout_s=float(podspec.termination_grace_seconds(spec.worker.extra_args)),
    )


def plan_rollout(fleet: Fleet, spec: MoEDeploymentSpec, now: float) -> Rollout:
    """The rollout of this run; a draining group's leader is asked what it still has."""
    groups = []
    for read in fleet.groups:
        in_flight = None
        leader = read.leader()
        if read.drain is not None and leader is not None:
            in_flight = leader_in_flight(leader, spec.worker.port)
        serving = read.serving(spec.pods)
        since = read.serving_since() if serving else None
        groups.append(Group(read.index, read.current, serving, read.drain, in_flight, since))
    return decide_rollout(groups, policy_of(spec), now, fleet.taken)


def apply_rollout(
    cluster: Cluster,
    owner: Owner,
    spec: MoEDeploymentSpec,
    fleet: Fleet,
    rollout: Rollout,
    now: float,
    *,
    hold: bool = False,
) -> list[tuple[str, str, str]]:
    """Create, drain, remove and restart groups as decided; returns the Events to post.
    `hold`: a start-up refusal is held for the spec (a new group starts with 0 pods)."""
    name, namespace = owner.name, owner.namespace
    events: list[tuple[str, str, str]] = []
    for index in rollout.create:
        body = children.build_statefulset(name, namespace, spec, index)
        if hold:
            body["spec"]["replicas"] = 0
        owner.adopt(body)
        stored = cluster.create(namespace, body)
        fleet.groups.append(GroupRead(index, stored, [], current=True))
        events.append(("Normal", "GroupCreated", f"group {index} ({body['metadata']['name']})"))
    for index, purpose in rollout.drain:
        group = fleet.group(index)
        if group is None:
            continue
        note = {naming.DRAIN_ANNOTATION: Drain(purpose, now).annotation()}
        cluster.patch(namespace, _annotated(group.statefulset, note))
        group.drain = Drain(purpose, now)
        verb = "to remove it" if purpose == "remove" else "to restart it on the new template"
        events.append(("Normal", "GroupDraining", f"group {index} ({group.name}) drains {verb}"))
    for index in rollout.remove:
        group = fleet.group(index)
        if group is None:
            continue
        pdb = cluster.get("PodDisruptionBudget", namespace, group.name)
        if pdb is not None and children.controlled_by(pdb, owner.uid):
            cluster.delete("PodDisruptionBudget", namespace, group.name, pdb["metadata"]["uid"])
        uid = group.statefulset["metadata"]["uid"]
        cluster.delete("StatefulSet", namespace, group.name, uid)
        for pod in group.pods:  # without waiting for the garbage collector
            cluster.delete_pod(namespace, pod["metadata"]["name"], pod["metadata"]["uid"])
        fleet.groups.remove(group)
        events.append(("Normal", "GroupRemoved", f"group {index} ({group.name}) drained"))
    for index in rollout.restart:
        group = fleet.group(index)
        if group is None:
            continue
        group.drain, group.current = None, True  # ensure_groups patches it to the template
        events.append(("Normal", "GroupRestart", f"group {index} ({group.name}) drained"))
    fleet.groups.sort(key=lambda group: group.index)
    return events


def _annotated(obj: dict[str, Any], annotations: dict[str, str | None]) -> dict[str, Any]:
    return {
        "apiVersion": obj.get("apiVersion", "apps/v1"),
        "kind": obj.get("kind", "StatefulSet"),
        "metadata": {"name": obj["metadata"]["name"], "annotations": annotations},
    }


def ensure_groups(
    cluster: Cluster, owner: Owner, spec: MoEDeploymentSpec, fleet: Fleet, *, hold: bool = False
) -> list[str]:
    """Keep current groups' StatefulSets in shape (old ones are left as they are until they
    go), every group's PodDisruptionBudget, and every pod's labels. Returns what changed.
    `hold`: the workers refused this spec (a held start-up refusal): every current group keeps
    0 pods, as they would all refuse it the same way; groups of an older template serve on."""
    name, namespace = owner.name, owner.namespace
    changes: list[str] = []
    api_version = cluster.pdb_api_version()
    for group in fleet.groups:
        if group.current and group.drain is None:
            body = children.build_statefulset(name, namespace, spec, group.index)
            body["metadata"]["annotations"] = {naming.DRAIN_ANNOTATION: None}
            if hold:
                body["spec"]["replicas"] = 0
            owner.adopt(body)
            outcome, group.statefulset = cluster.ensure(namespace, body, group.statefulset)
            if outcome != "unchanged":
                changes.append(f"StatefulSet {group.name} {outcome}")
        pdb = children.build_pdb(name, spec, api_version, group.index)
        found = cluster.get("PodDisruptionBudget", namespace, group.name)
        if found is None or children.controlled_by(found, owner.uid):
            owner.adopt(pdb)
            outcome, _ = cluster.ensure(namespace, pdb, found)
            if outcome != "unchanged":
                changes.append(f"PodDisruptionBudget {group.name} {outcome}")
    label_pods(cluster, namespace, fleet)
    return changes


def label_pods(cluster: Cluster, namespace: str, fleet: Fleet) -> None:
    """Every pod's group, and its leaders' role and traffic labels (what the router and
    `<name>-api` select)."""
    for group in fleet.groups:
        for pod in group.pods:
            _label(cluster, namespace, group, pod)


def _label(cluster: Cluster, namespace: str, group: GroupRead, pod: dict[str, Any]) -> None:
    meta = pod["metadata"]
    if meta.get("deletionTimestamp"):
        return
    leader = meta["name"] == f"{group.name}-0"
    wanted = naming.pod_labels(group.index, leader=leader, traffic=group.drain is None)
    have = meta.get("labels") or {}
    if all(have.get(key) == value for key, value in wanted.items()):
        return
    if cluster.label_pod(namespace, pod, wanted):
        meta["labels"] = {
            **{k: v for k, v in have.items() if wanted.get(k, v) is not None},
            **{k: v for k, v in wanted.items() if v is not None},
        }
