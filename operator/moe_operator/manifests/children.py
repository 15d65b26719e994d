"""Pure builders of a MoEDeployment's children, as plain dicts ready for the API server.

Owner references are added at the boundary (`kopf.adopt` in the handlers), so these functions
know nothing of the parent object beyond its name and namespace; `controlled_by` is the check
that an object found under a child's name is really this deployment's.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any

from moe_contract import env as worker_env
from moe_contract.plan import PLAN_FILE_NAME, Plan
from moe_contract.settings import OPERATOR, SETTINGS, WORKER_SETTINGS
from moe_operator.api import DEFAULT_GPU_RESOURCE, MoEDeploymentSpec
from moe_operator.groups.naming import DEPLOYMENT_LABEL, GROUP_LABEL, group_name, serving_leaders
from moe_operator.manifests import podspec, router
from moe_operator.planning.record import PlanShape

GPU_RESOURCE = DEFAULT_GPU_RESOURCE  # worker.gpuResourceName's default
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"  # set by the StatefulSet controller
CONTAINER_NAME = "worker"
TERMINATION_MESSAGE_PATH = worker_env.TERMINATION_MESSAGE_FILE
PLAN_VERSION_ANNOTATION = "moe-ep.io/plan-version"
LAST_REBALANCE_ANNOTATION = "moe-ep.io/last-rebalance"  # JSON: the status' lastRebalance
ISSUED_AT_ANNOTATION = "moe-ep.io/issued-at"  # seconds since the epoch: the cooldown's start


def controlled_by(obj: Mapping[str, Any] | None, uid: str) -> bool:
    """Whether `obj` names the object of `uid` as its controller: the only children the
    operator patches, deletes or trusts (a same-name object it did not create is none of these)."""
    references = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == uid for ref in references)


def plan_shape(spec: MoEDeploymentSpec) -> PlanShape:
    """The shape the deployment's plan must fit; its key names the plan in the ConfigMap."""
    return PlanShape(
        layers=spec.model.layers,
        experts=spec.model.experts_per_layer,
        world=spec.parallelism.world_size,
        slots_per_rank=spec.placement.slots_per_rank,
        max_slots_per_rank=spec.placement.most_slots_per_rank,
    )


def worker_labels(name: str) -> dict[str, str]:
    """Labels on every child; `selector_labels` is the stable subset pods are selected by."""
    return {
        "app.kubernetes.io/name": "moe-ep-worker",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "moe-ep",
        "app.kubernetes.io/managed-by": "moe-ep-operator",
        DEPLOYMENT_LABEL: name,
    }


EXPERT_SERIES_LABEL = "moe-ep.io/expert-series"
"""On worker pods of a PerLayer deployment: the PodMonitor drops their per-expert series."""


def series_labels(spec: MoEDeploymentSpec) -> dict[str, str]:
    """The pod label of metrics.expertSeries PerLayer; none for PerRank (the default), so that
    templates of PerRank deployments stay as they were."""
    series = spec.metrics.expert_series
    return {EXPERT_SERIES_LABEL: series} if series != "PerRank" else {}


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "moe-ep-worker", DEPLOYMENT_LABEL: name}


def service_name(name: str) -> str:
    return f"{name}-workers"


def plan_configmap_name(name: str) -> str:
    return f"{name}-plan"


def token_secret_name(name: str) -> str:
    return f"{name}-control"


def api_service_name(name: str) -> str:
    return f"{name}-api"


def api_endpoint(name: str, namespace: str, spec: MoEDeploymentSpec) -> str:
    """Base URL of the OpenAI-compatible API inside the cluster (status.endpoint)."""
    return f"http://{api_service_name(name)}.{namespace}.svc:{spec.worker.api_port}/v1"


def served_model_name(name: str, spec: MoEDeploymentSpec) -> str:
    """The `model` clients send: the spec's, else the checkpoint directory's name, else the
    deployment's (synthetic weights, or a checkpoint at the volume's root)."""
    if spec.model.served_model_name:
        return spec.model.served_model_name
    checkpoint = spec.model.source.checkpoint
    if spec.model.source.type == "Checkpoint" and checkpoint is not None:
        mounted = checkpoint.mounted_path()
        if mounted != worker_env.CHECKPOINT_MOUNT_DIR:
            return mounted.rsplit("/", 1)[-1]
    return name


def master_address(name: str, namespace: str, group: int = 0) -> str:
    """DNS name of the group's rank 0 through the headless Service (every group shares it)."""
    return f"{group_name(name, group)}-0.{service_name(name)}.{namespace}.svc"


def group_selector(name: str, group: int) -> dict[str, str]:
    """The pods of one group. Group 0's StatefulSet keeps the selector it always had (a
    selector is immutable): the operator tells its pods apart by the group label it sets."""
    labels = selector_labels(name)
    return labels if group == 0 else {**labels, GROUP_LABEL: str(group)}


def build_service(name: str, spec: MoEDeploymentSpec) -> dict[str, Any]:
    """Headless Service giving every rank a stable DNS name, ready or not (rendezvous needs it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "labels": worker_labels(name)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [
                {"name": "metrics", "port": spec.worker.port, "protocol": "TCP"},
                {"name": "rendezvous", "port": spec.worker.master_port, "protocol": "TCP"},
            ],
        },
    }


def build_api_service(
    name: str, spec: MoEDeploymentSpec, router_available: bool = False
) -> dict[str, Any]:
    """The OpenAI-compatible API: the router once it is available, else the leaders of the
    groups that take traffic (a leader is ready only once its whole group formed and loaded its
    plan): the Service routes to groups that serve, or to nothing. The selector a single-group
    deployment had (its pod 0 by name) is removed (null: a merge patch drops it)."""
    # A merge patch keeps keys it does not name: every key either selector has is named, the
    # unused ones null (removed), so moving between router and leaders leaves no stale key.
    unused = {POD_NAME_LABEL, *router.router_selector(name), *serving_leaders(name)}
    selector: dict[str, str | None] = {
        **dict.fromkeys(unused),
        **router.api_selector(name, spec, router_available),
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": api_service_name(name), "labels": worker_labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "http",
                    "port": spec.worker.api_port,
                    "targetPort": "api",
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_plan_configmap(
    name: str, plans: Mapping[str, Plan], annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The durable record of the desired plan, one key per model shape (`PlanShape.key`);
    mounted into pods so a restarted rank resumes it. `annotations` carry what status needs
    back if it is lost (the last rebalance, when it was issued). A large plan is stored in its
    compact form (`Plan.to_stored_json`), which the workers read as well."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan_configmap_name(name),
            "labels": worker_labels(name),
            "annotations": dict(annotations or {}),
        },
        "data": {key: plan.to_stored_json() for key, plan in plans.items()},
    }


def build_token_secret(name: str, token: str | None = None) -> dict[str, Any]:
    """The workers' control token; created once and never rotated by updates."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token_secret_name(name), "labels": worker_labels(name)},
        "type": "Opaque",
        "stringData": {worker_env.TOKEN_FILE_NAME: token or secrets.token_urlsafe(32)},
    }


@dataclass(frozen=True)
class FieldRef:
    """A setting the pod learns from the downward API (a field of its own object)."""

    path: str


def _env_var(name: str, value: object) -> dict[str, Any]:
    if isinstance(value, FieldRef):
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": value.path}}}
    return {"name": name, "value": str(value)}


def worker_settings(
    name: str, namespace: str, spec: MoEDeploymentSpec, group: int = 0
) -> dict[str, object]:
    """The value of every setting the operator sets on worker pods (the rows of the contract's
    table set by OPERATOR), by name: the spec field the row names, else what the MoEDeployment
    implies. None: not set (no checkpoint with synthetic weights, no keys file for an open API)."""
    source, keys = spec.model.source, spec.worker.api_keys
    checkpoint = source.checkpoint if source.type == "Checkpoint" else None
    implied: dict[str, object] = {
        "world_size": spec.parallelism.world_size,
        "ranks_per_pod": spec.worker.local_ranks(),
        "master_addr": master_address(name, namespace, group),
        # The workers refuse (HTTP 422) a plan growing past it: the memory given to experts.
        "max_slots_per_rank": spec.placement.most_slots_per_rank,
        "checkpoint": None if checkpoint is None else checkpoint.mounted_path(),
        "plan_path": f"{worker_env.PLAN_MOUNT_DIR}/{PLAN_FILE_NAME}",
        "token_path": f"{worker_env.TOKEN_MOUNT_DIR}/{worker_env.TOKEN_FILE_NAME}",
        "api_keys_path": f"{worker_env.API_KEYS_MOUNT_DIR}/{worker_env.API_KEYS_FILE_NAME}"
        if keys.secret_name
        else None,
        "served_model_name": served_model_name(name, spec),
        # Where the container's termination message goes (the kubelet reads it back into the
        # pod's status; the operator shows a start-up refusal from there).
        "termination_message_path": TERMINATION_MESSAGE_PATH,
        "pod_ip": FieldRef("status.podIP"),
    }
    return {
        s.name: reduce(getattr, s.spec.split("."), spec) if s.spec else implied[s.name]
        for s in WORKER_SETTINGS
        if s.pod == OPERATOR
    }


def _worker_env(
    name: str, namespace: str, spec: MoEDeploymentSpec, group: int
) -> list[dict[str, Any]]:
    settings = [
        (SETTINGS[key].variable, value)
        for key, value in worker_settings(name, namespace, spec, group).items()
        if value is not None
    ]
    # The process group's settings (the table's first rows, up to the device), then the layout
    # and the shape, then the rest: the order pods have always had (another would change every
    # pod template, and so restart every group).
    cut = 1 + [variable for variable, _ in settings].index(worker_env.DEVICE)
    layout = spec.parallelism
    values: dict[str, object] = {
        **dict(settings[:cut]),
        worker_env.EXPERT_PARALLEL: layout.expert,
        worker_env.TENSOR_PARALLEL: layout.tensor,
        worker_env.PIPELINE_PARALLEL: layout.pipeline,
        **worker_env.shape_to_env(spec.model.to_shape()),
        **dict(settings[cut:]),
    }
    pod_name = _env_var(worker_env.POD_NAME, FieldRef("metadata.name"))
    fixed = [_env_var(key, value) for key, value in values.items()]
    network = podspec.network_env(spec)
    extra = [{"name": item.name, "value": item.value} for item in spec.worker.extra_env]
    return [pod_name, *fixed, *network, *extra]


def _resources(spec: MoEDeploymentSpec) -> dict[str, dict[str, str]]:
    requests = dict(spec.worker.resources.requests)
    limits = dict(spec.worker.resources.limits)
    for resource, count in podspec.gpu_resources(spec).items():
        # Extended resources must be equal in requests and limits.
        requests[resource] = limits[resource] = count
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _serving_volumes(spec: MoEDeploymentSpec) -> list[tuple[dict[str, Any], str]]:
    """(pod volume, where the worker mounts it read-only): the checkpoint, the API keys."""
    found = []
    checkpoint = spec.model.source.checkpoint
    if spec.model.source.type == "Checkpoint" and checkpoint is not None:
        # The user's volume source as written (validation made sure it holds data and is not
        # asked to be writable); the mount is read-only whatever the source says.
        volume = {"name": "checkpoint", **checkpoint.volume.kinds()}
        found.append((volume, worker_env.CHECKPOINT_MOUNT_DIR))
    keys = spec.worker.api_keys
    if keys.secret_name:
        items = [{"key": keys.key, "path": worker_env.API_KEYS_FILE_NAME}]
        volume = {"name": "api-keys", "secret": {"secretName": keys.secret_name, "items": items}}
        found.append((volume, worker_env.API_KEYS_MOUNT_DIR))
    return found


LIVENESS_PERIOD_S = 5


def probe_timeout_s(ranks_per_pod: int) -> int:
    """A pod of several ranks answers a probe by asking each (up to 2 s): more than the
    kubelet's default 1 s, which a pod of one rank keeps."""
    return 5 if ranks_per_pod > 1 else 1


def liveness_probe(stall_timeout_s: int, ranks_per_pod: int = 1) -> dict[str, Any]:
    """The worker's watchdog turns /healthz 503 once its serving loop made no step for
    `stall_timeout_s` (a hung collective, a stopped peer); a few failures 5 s apart then restart
    the container, and the operator, seeing the restart, brings the whole group back. A pod that
    does not answer at all (a stopped process) is restarted after about half the stall timeout:
    a short pause that heals (a page-in storm, a debugger) is not punished. A one-rank pod
    answers only once torch is imported: the initial delay covers that on a busy node."""
    return {
        "httpGet": {"path": "/healthz", "port": "metrics"},
        "initialDelaySeconds": 30,
        "periodSeconds": LIVENESS_PERIOD_S,
        "timeoutSeconds": probe_timeout_s(ranks_per_pod),
        "failureThreshold": max(3, -(-stall_timeout_s // (2 * LIVENESS_PERIOD_S))),
    }


def build_statefulset(
    name: str, namespace: str, spec: MoEDeploymentSpec, group: int = 0
) -> dict[str, Any]:
    """Group `group`'s pods (world size / ranks per pod), started together (Parallel): the
    process group needs all of them. Pod p runs ranks p x ranksPerPod .. (p + 1) x ranksPerPod
    - 1. Group 0's is exactly what a single-group deployment always had (`groups.naming`).

    OnDelete: the StatefulSet controller never replaces pods one at a time on a template change
    (a process group cannot mix templates); the operator replaces the whole group at once.
    """
    worker = spec.worker
    http_probe = {
        "httpGet": {"path": "/readyz", "port": "metrics"},
        "periodSeconds": 5,
        "timeoutSeconds": probe_timeout_s(worker.local_ranks()),
    }
    container = {
        "name": CONTAINER_NAME,
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["moe-worker"],
        "args": ["serve", *worker.extra_args],
        "env": _worker_env(name, namespace, spec, group),
        "ports": [
            {"name": "metrics", "containerPort": worker.port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": worker.master_port, "protocol": "TCP"},
            {"name": "api", "containerPort": worker.api_port, "protocol": "TCP"},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # A start-up refusal writes the file; any other crash still says why (its log's end).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "readinessProbe": http_probe,
        "livenessProbe": liveness_probe(worker.stall_timeout_seconds, worker.local_ranks()),
        "resources": _resources(spec),
        "securityContext": podspec.container_security_context(spec),
        "volumeMounts": [
            {"name": "plan", "mountPath": worker_env.PLAN_MOUNT_DIR, "readOnly": True},
            {"name": "control", "mountPath": worker_env.TOKEN_MOUNT_DIR, "readOnly": True},
        ],
    }
    # The pod maps its own shape's key onto plan.json: pods of an older template keep reading
    # their shape's plan while a group restart brings the new shape's pods up.
    plan_items = [{"key": plan_shape(spec).key, "path": PLAN_FILE_NAME}]
    volumes: list[dict[str, Any]] = [
        {"name": "plan", "configMap": {"name": plan_configmap_name(name), "items": plan_items}},
        {"name": "control", "secret": {"secretName": token_secret_name(name)}},
    ]
    shm, shm_mount = podspec.shm_volume(spec)
    volumes.append(shm)
    container["volumeMounts"].append(shm_mount)
    for volume, mount_path in _serving_volumes(spec):
        volumes.append(volume)
        container["volumeMounts"].append(
            {"name": volume["name"], "mountPath": mount_path, "readOnly": True}
        )
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": podspec.termination_grace_seconds(worker.extra_args),
        **podspec.pod_fields(spec, group_selector(name, group)),
    }
    if worker.node_selector:
        pod_spec["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        pod_spec["tolerations"] = [
            toleration.model_dump(by_alias=True, exclude_defaults=True)
            for toleration in worker.tolerations
        ]
    extra_labels, extra_annotations = podspec.pod_metadata(group_name(name, group), spec)
    selector = group_selector(name, group)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": group_name(name, group),
            "labels": {**podspec.statefulset_labels(spec), **worker_labels(name)},
        },
        "spec": {
            "serviceName": service_name(name),
            "replicas": spec.pods,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete", "rollingUpdate": None},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    # the operator's own labels and annotations win over the spec's extras
                    "labels": {
                        **extra_labels,
                        **worker_labels(name),
                        **series_labels(spec),
                        **selector,
                    },
                    "annotations": {
                        **extra_annotations,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(worker.port),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_pdb(
    name: str, spec: MoEDeploymentSpec, api_version: str, group: int = 0
) -> dict[str, Any]:
    """One group's PodDisruptionBudget (`podspec.build_pdb`), selecting that group's pods by
    the group label only (group 0's pods get it from the operator): PodDisruptionBudgets that
    share a pod make the eviction API refuse it."""
    selector = {**selector_labels(name), GROUP_LABEL: str(group)}
    return podspec.build_pdb(
        group_name(name, group), spec, api_version, worker_labels(name), selector
    )
