"""Worker pod events, to the leader at once: a thin shell.

A non-leader worker pod deleted, or whose worker exited, is a rank lost: the leader of its
group is told (POST /v1/group/lost) as the event arrives, so the survivors drop it without
waiting for its heartbeat to go silent. What counts is pure (`rankloss.lost_report`). Only the
StatefulSet's own pods are believed, and the control token goes only to its pod 0 (the
StatefulSet controlled by a MoEDeployment, the token Secret by the same one); with replica
groups, the pod's own group's (the StatefulSet that controls it). A report is sent
once per pod incarnation (uid and restart count); one that cannot be delivered is left to the
heartbeat, which drops the rank anyway. Never raises into kopf.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from moe_contract import env as worker_env
from moe_operator import handoff
from moe_operator.kube import Cluster, secret_value
from moe_operator.manifests import children
from moe_operator.rankloss import lost_report

log = logging.getLogger(__name__)


@kopf.on.event("", "v1", "pods", labels={children.DEPLOYMENT_LABEL: kopf.PRESENT})
def pod_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        _report(str(event.get("type") or ""), dict(body), memo)
    except Exception as error:  # the heartbeat drops the rank anyway; never break the watch
        log.warning("could not tell the leader about pod %s: %s", body.metadata.name, error)


def _report(kind: str, pod: dict[str, Any], memo: kopf.Memo) -> None:
    meta = pod.get("metadata") or {}
    report = lost_report(pod, kind, int(_env(pod, worker_env.RANKS_PER_POD) or 1))
    key = (meta.get("uid"), _restarts(pod), kind == "DELETED")
    if report is None or memo.get("reported") == key:
        return
    cluster: Cluster = memo.cluster
    name, namespace = meta["labels"][children.DEPLOYMENT_LABEL], meta.get("namespace", "")
    group = _statefulset_name(pod)  # the pod's replica group (group 0's is the deployment's)
    if group is None:
        return
    statefulset = cluster.get("StatefulSet", namespace, group)
    if statefulset is None or not children.controlled_by(pod, statefulset["metadata"]["uid"]):
        return
    owner = next(
        (r.get("uid") for r in statefulset["metadata"].get("ownerReferences") or []
         if r.get("controller")), None,
    )  # fmt: skip
    secret = cluster.get("Secret", namespace, children.token_secret_name(name))
    token = secret_value(secret, worker_env.TOKEN_FILE_NAME) if owner else None
    if token is None or not children.controlled_by(secret, owner or ""):
        return
    leader = _leader_url(cluster, namespace, name, statefulset["metadata"]["uid"])
    if leader is None:
        return
    ranks, why = report
    try:
        taken = handoff.report_lost(leader, ranks, why, token)
    except handoff.HandoffError as error:
        log.info("the leader of %s/%s did not take the news (%s): %s", namespace, name, why, error)
        return
    memo.reported = key
    if taken:
        log.info("told the leader of %s/%s: ranks %s lost (%s)", namespace, name, ranks, why)


def _statefulset_name(pod: dict[str, Any]) -> str | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "StatefulSet":
            return str(ref.get("name"))
    return None


def _leader_url(cluster: Cluster, namespace: str, name: str, owner_uid: str) -> str | None:
    """Pod 0 of the group's StatefulSet (uid `owner_uid`): its other pods' leader."""
    for pod in cluster.list_pods(namespace, children.selector_labels(name)):
        meta = pod.get("metadata") or {}
        if worker_env.rank_from_pod_name(meta.get("name", "")) != 0:
            continue
        ip = (pod.get("status") or {}).get("podIP")
        port = _env(pod, worker_env.HTTP_PORT)
        if ip and port and children.controlled_by(pod, owner_uid):
            return f"http://{ip}:{port}"
    return None


def _env(pod: dict[str, Any], variable: str) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for item in container.get("env") or []:
            if item.get("name") == variable and "value" in item:
                return str(item["value"])
    return None


def _restarts(pod: dict[str, Any]) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount") or 0) for s in statuses)
