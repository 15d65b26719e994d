"""The router in front of the replica groups: smg, the Shepherd Model Gateway (pure builders).

smg is a maintained router (retries before the first byte, health checks, circuit breakers,
Prometheus metrics); moe-ep configures it, it does not write one. The operator runs it as the
Deployment `<name>-router` (2 replicas, a PodDisruptionBudget) whose ServiceAccount may only read
pods of the namespace: smg watches them and routes to the leaders of the groups that take
traffic (`groups.naming.serving_leaders`), on their API port, probing each one's `/health`
(200 only while its whole group serves). A leader whose group drains leaves its selector by a
label, so smg stops sending to it at once; a request that fails before its first byte (a group
that died, a 503 of one that cannot serve) is retried on another group.
"""

from __future__ import annotations

from typing import Any

from moe_operator.api import MoEDeploymentSpec
from moe_operator.groups.naming import DEPLOYMENT_LABEL, serving_leaders

ROUTER_REPOSITORY = "docker.io/lightseekorg/smg"
ROUTER_VERSION = "1.13.0"  # the smg release the project is tested with (pyproject's pin)
DEFAULT_ROUTER_IMAGE = f"{ROUTER_REPOSITORY}:{ROUTER_VERSION}"
METRICS_PORT = 29000
HEALTH_CHECK_INTERVAL_S = 2  # smg's default is 60 s: a group that stops serving leaves sooner
CONTAINER_NAME = "router"


def router_name(name: str) -> str:
    """The Deployment, ServiceAccount, Role, RoleBinding and PodDisruptionBudget of the router."""
    return f"{name}-router"


def router_labels(name: str) -> dict[str, str]:
    """Labels of the router's objects; the pods are selected by all of them."""
    return {
        "app.kubernetes.io/name": "moe-ep-router",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "router",
        "app.kubernetes.io/part-of": "moe-ep",
        "app.kubernetes.io/managed-by": "moe-ep-operator",
        DEPLOYMENT_LABEL: name,
    }


def router_pod_labels(name: str) -> dict[str, str]:
    """The router pods' labels: without the deployment label, which selects worker pods (the
    operator's own lists, `kubectl get pods -l moe-ep.io/deployment=NAME` in docs and alerts)."""
    return {key: value for key, value in router_labels(name).items() if key != DEPLOYMENT_LABEL}


def router_selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "moe-ep-router", "app.kubernetes.io/instance": name}


def router_args(name: str, namespace: str, spec: MoEDeploymentSpec) -> list[str]:
    """`smg launch`'s command line: Kubernetes discovery of the serving leaders."""
    selector = [f"{key}={value}" for key, value in sorted(serving_leaders(name).items())]
    router = spec.router
    return [
        "launch",
        "--host",
        "$(POD_IP)",
        "--port",
        str(router.port),
        "--policy",
        router.policy,
        "--service-discovery",
        "--selector",
        *selector,
        "--service-discovery-port",
        str(spec.worker.api_port),
        "--service-discovery-namespace",
        namespace,
        "--health-check-endpoint",
        "/health",
        "--health-check-interval-secs",
        str(HEALTH_CHECK_INTERVAL_S),
        "--health-failure-threshold",
        "1",
        "--health-success-threshold",
        "1",
        "--prometheus-host",
        "$(POD_IP)",
        "--prometheus-port",
        str(METRICS_PORT),
        "--disable-tokenizer-autoload",
    ]


def build_service_account(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": router_name(name), "labels": router_labels(name)},
    }


def build_role(name: str) -> dict[str, Any]:
    """smg's discovery watches pods of the namespace; nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": router_name(name), "labels": router_labels(name)},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }


def build_role_binding(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": router_name(name), "labels": router_labels(name)},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": router_name(name),
        },
        "subjects": [{"kind": "ServiceAccount", "name": router_name(name)}],
    }


def _probe(path: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "api"}, "periodSeconds": 5, "timeoutSeconds": 2}


def build_deployment(
    name: str, namespace: str, spec: MoEDeploymentSpec, image: str
) -> dict[str, Any]:
    """The router pods: `smg launch` with discovery, restricted Pod Security, its own
    ServiceAccount (the token is mounted: smg's Kubernetes client needs it)."""
    router = spec.router
    container = {
        "name": CONTAINER_NAME,
        "image": router.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["smg"],
        "args": router_args(name, namespace, spec),
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            # "api", as the workers' API port: `<name>-api` targets it whichever it selects
            {"name": "api", "containerPort": router.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {**_probe("/liveness"), "initialDelaySeconds": 10},
        "readinessProbe": _probe("/readiness"),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "labels": router_labels(name)},
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": router_selector(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": router_pod_labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": router_name(name),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }


def build_pdb(name: str, api_version: str) -> dict[str, Any]:
    """One router pod may go at a time (a drain, an autoscaler), never both."""
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {"name": router_name(name), "labels": router_labels(name)},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": router_selector(name)}},
    }


def api_selector(name: str, spec: MoEDeploymentSpec, router_available: bool) -> dict[str, str]:
    """What `<name>-api` routes to: the router once one of its pods is available, else (no
    router, or while it starts: an upgrade keeps serving) the leaders that take traffic."""
    if spec.router.type == "Smg" and router_available:
        return router_selector(name)
    return serving_leaders(name)
