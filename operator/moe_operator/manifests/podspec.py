"""The NCCL-ready parts of a worker pod, and the gang's PodDisruptionBudget (pure builders).

`children.build_statefulset` lays out the container (command, env, ports, probes, volumes); this
module adds what a multi-node GPU job needs and what a cluster's policies expect:

- /dev/shm as a memory emptyDir (NCCL's shared-memory transport between the GPUs of a pod);
- NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, hostNetwork and IPC_LOCK for RDMA fabrics;
- the GPU resource by its device plugin's name, and more extended resources (rdma/ib);
- a security context that passes the `restricted` Pod Security profile unless the spec asks for
  hostNetwork or IPC_LOCK (`restricted_problems` says which rule breaks);
- scheduling fields (affinity, spread, priority, scheduler) and gang-scheduling metadata for
  Volcano, Kueue and the scheduler-plugins coscheduling plugin;
- a PodDisruptionBudget that forbids any voluntary eviction: one evicted rank breaks the group.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from moe_contract.settings import USER_SETTINGS
from moe_operator.api import MoEDeploymentSpec

SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
SOCKET_ENV = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
"""Set from worker.network.socketInterface; extraEnv may not set them as well."""

PDB_V1 = "policy/v1"  # Kubernetes >= 1.21
PDB_V1BETA1 = "policy/v1beta1"  # Kubernetes <= 1.24 (the local cluster is 1.20)
PDB_API_VERSIONS = (PDB_V1, PDB_V1BETA1)

VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
GANG_SCHEDULERS = {"Volcano": "volcano", "SchedulerPlugins": "scheduler-plugins-scheduler"}
"""schedulerName each gang scheduler runs under by default (Kueue admits; it schedules nothing)."""


def shm_volume(spec: MoEDeploymentSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pod volume, the container's mount) of /dev/shm."""
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if spec.worker.shm.size_limit:
        empty_dir["sizeLimit"] = spec.worker.shm.size_limit
    return {"name": SHM_VOLUME, "emptyDir": empty_dir}, {"name": SHM_VOLUME, "mountPath": SHM_PATH}


def network_env(spec: MoEDeploymentSpec) -> list[dict[str, str]]:
    """The socket interfaces NCCL and gloo bind; none when unset (their own detection works on
    a plain pod network, and the local cluster's pods live on the loopback)."""
    interface = spec.worker.network.socket_interface
    return [{"name": name, "value": interface} for name in SOCKET_ENV] if interface else []


def gpu_resources(spec: MoEDeploymentSpec) -> dict[str, str]:
    """Extended resources of the container: the GPUs and the extra ones (request == limit)."""
    worker = spec.worker
    found = dict(worker.extra_resources)
    if worker.gpus_per_pod:
        found[worker.gpu_resource_name] = str(worker.gpus_per_pod)
    return found


def pod_security_context(spec: MoEDeploymentSpec) -> dict[str, Any]:
    security = spec.worker.security
    return {
        "runAsNonRoot": True,
        "runAsUser": security.run_as_user,
        "runAsGroup": security.run_as_group,
        "fsGroup": security.run_as_group,  # mounted Secrets and ConfigMaps readable by it
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(spec: MoEDeploymentSpec) -> dict[str, Any]:
    capabilities: dict[str, list[str]] = {"drop": ["ALL"]}
    if spec.worker.network.ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "capabilities": capabilities}


DRAIN_FLAG = "--drain-timeout"
STOP_MARGIN_S = 10
"""Past the drain: the launcher's 5 s for ranks to exit, the HTTP servers' last writes."""


def termination_grace_seconds(extra_args: list[str]) -> int:
    """The pod's terminationGracePeriodSeconds: the worker's drain (SIGTERM: not ready, running
    sequences finish, then exit; `--drain-timeout` in extraArgs, else its default) and a margin,
    so the kubelet's SIGKILL never cuts a drain short. 30 s for the default 20 s drain."""
    drain = USER_SETTINGS[DRAIN_FLAG].default
    for index, arg in enumerate(extra_args):  # validated: each flag has one value
        flag, equals, value = arg.partition("=")
        if flag == DRAIN_FLAG:
            text = (
                value if equals else (extra_args[index + 1] if index + 1 < len(extra_args) else "")
            )
            with contextlib.suppress(ValueError):  # admission refuses it; the builder is total
                drain = USER_SETTINGS[DRAIN_FLAG].read(text)
    return math.ceil(drain) + STOP_MARGIN_S


def pod_fields(spec: MoEDeploymentSpec, selector: dict[str, str]) -> dict[str, Any]:
    """Pod-level fields: security, service-account token, network and scheduling.
    `selector`: the labels that select this deployment's pods (a spread constraint's default)."""
    worker, scheduling = spec.worker, spec.worker.scheduling
    fields: dict[str, Any] = {
        "securityContext": pod_security_context(spec),
        # Workers never call the API server: no token in the pod to leak.
        "automountServiceAccountToken": False,
    }
    if worker.network.host_network:
        # ClusterFirstWithHostNet keeps cluster DNS (rank 0's name) on the host network.
        fields["hostNetwork"] = True
        fields["dnsPolicy"] = "ClusterFirstWithHostNet"
    if scheduling.affinity:
        fields["affinity"] = dict(scheduling.affinity)
    if scheduling.topology_spread_constraints:
        fields["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": dict(selector)}, **constraint}
            for constraint in scheduling.topology_spread_constraints
        ]
    if scheduling.priority_class_name:
        fields["priorityClassName"] = scheduling.priority_class_name
    scheduler = scheduling.scheduler_name or GANG_SCHEDULERS.get(scheduling.gang.scheduler, "")
    if scheduler:
        fields["schedulerName"] = scheduler
    return fields


def gang_group_name(name: str, spec: MoEDeploymentSpec) -> str:
    return spec.worker.scheduling.gang.group_name or name


def pod_metadata(name: str, spec: MoEDeploymentSpec) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) the pods carry beyond the operator's own: the spec's extras and
    the gang scheduler's."""
    scheduling = spec.worker.scheduling
    gang = scheduling.gang
    labels, annotations = dict(scheduling.pod_labels), dict(scheduling.pod_annotations)
    if gang.scheduler == "Volcano":
        annotations[VOLCANO_GROUP_ANNOTATION] = gang_group_name(name, spec)
        if gang.queue_name:
            annotations[VOLCANO_QUEUE_ANNOTATION] = gang.queue_name
    elif gang.scheduler == "Kueue":
        labels[KUEUE_QUEUE_LABEL] = gang.queue_name
    elif gang.scheduler == "SchedulerPlugins":
        labels[COSCHEDULING_GROUP_LABEL] = gang_group_name(name, spec)
    return labels, annotations


def statefulset_labels(spec: MoEDeploymentSpec) -> dict[str, str]:
    """Labels the StatefulSet itself needs beyond the operator's: Kueue admits the workload by
    its owner's queue label (its StatefulSet integration)."""
    gang = spec.worker.scheduling.gang
    return {KUEUE_QUEUE_LABEL: gang.queue_name} if gang.scheduler == "Kueue" else {}


def pdb_name(name: str) -> str:
    return name


def build_pdb(
    name: str,
    spec: MoEDeploymentSpec,
    api_version: str,
    labels: dict[str, str],
    selector: dict[str, str],
) -> dict[str, Any]:
    """The gang's PodDisruptionBudget: every pod must stay (minAvailable = the pods), so a
    drain or an autoscaler never evicts one rank and breaks the whole process group; it waits
    until the deployment is deleted or moved (docs/gpu-cluster.md). `api_version`: what the API
    server serves (policy/v1 from 1.21; v1beta1 only up to 1.24)."""
    if api_version not in PDB_API_VERSIONS:
        raise ValueError(
            f"PodDisruptionBudget apiVersion {api_version!r}: not one of "
            f"{', '.join(PDB_API_VERSIONS)}"
        )
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {"name": pdb_name(name), "labels": dict(labels)},
        "spec": {
            "minAvailable": spec.pods,  # pods, not ranks: a pod holds ranksPerPod ranks
            "selector": {"matchLabels": dict(selector)},
        },
    }


def pdb_api_version_for(kubernetes_version: str) -> str:
    """The PodDisruptionBudget apiVersion of a Kubernetes release ('1.20', 'v1.30.2')."""
    parts = kubernetes_version.lstrip("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(
            f"Kubernetes version {kubernetes_version!r}: expected MAJOR.MINOR, e.g. 1.30"
        ) from None
    return PDB_V1 if (major, minor) >= (1, 21) else PDB_V1BETA1


def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the `restricted` Pod Security Standard (Kubernetes 1.25's
    rules, baseline's included for the fields the operator sets); empty: it passes."""
    problems = []
    pod_context = pod_spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"{key} is true")
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"volume {volume['name']} is a hostPath")
    containers = [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]
    for container in containers:
        where = f"container {container['name']}"
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{where} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}: capabilities must drop ALL")
        added = [cap for cap in capabilities.get("add") or [] if cap != "NET_BIND_SERVICE"]
        if added:
            problems.append(f"{where} adds capabilities {', '.join(added)}")
        for key in ("runAsNonRoot", "runAsUser"):
            value = context.get(key, pod_context.get(key))
            if key == "runAsNonRoot" and value is not True:
                problems.append(f"{where}: runAsNonRoot must be true")
            if key == "runAsUser" and value == 0:
                problems.append(f"{where}: runAsUser must not be 0")
        seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where} uses hostPort {port['hostPort']}")
    return problems
