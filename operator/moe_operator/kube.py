"""The operator's few calls to the Kubernetes API, behind one small class.

Handlers decide; this module only talks. Objects go in and out as plain dicts (the shape the pure
builders produce), so nothing else in the operator depends on the client's model classes.
"""

from __future__ import annotations

from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

MERGE_PATCH = "application/merge-patch+json"


def load_client_config() -> None:
    """In a pod: its ServiceAccount; elsewhere: KUBECONFIG (as kopf itself does)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Cluster:
    """Create-or-patch children and read what the status needs."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self._client = api_client or kubernetes.client.ApiClient()
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._apps = kubernetes.client.AppsV1Api(self._client)

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self._client.sanitize_for_serialization(obj)

    def _calls(self, kind: str) -> tuple[Any, Any, Any]:
        api = self._apps if kind == "StatefulSet" else self._core
        snake = {"StatefulSet": "stateful_set", "ConfigMap": "config_map"}.get(kind, kind.lower())
        return (
            getattr(api, f"read_namespaced_{snake}"),
            getattr(api, f"create_namespaced_{snake}"),
            getattr(api, f"patch_namespaced_{snake}"),
        )

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read, _, _ = self._calls(kind)
        try:
            return self._plain(read(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        _, create, _ = self._calls(body["kind"])
        return self._plain(create(namespace, body))

    def patch(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch: lists (containers, env) are replaced whole, as the builder wants."""
        _, _, patch = self._calls(body["kind"])
        return self._plain(
            patch(body["metadata"]["name"], namespace, body, _content_type=MERGE_PATCH)
        )

    def create_or_patch(self, namespace: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Returns ("created" | "updated" | "unchanged", the object as stored)."""
        current = self.get(body["kind"], namespace, body["metadata"]["name"])
        if current is None:
            return "created", self.create(namespace, body)
        if _contains(current, body):
            return "unchanged", current
        return "updated", self.patch(namespace, body)

    def create_if_missing(self, namespace: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        current = self.get(body["kind"], namespace, body["metadata"]["name"])
        if current is not None:
            return "unchanged", current
        return "created", self.create(namespace, body)

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        pods = self._core.list_namespaced_pod(namespace, label_selector=label_selector)
        return [self._plain(pod) for pod in pods.items]

    def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        import base64

        secret = self.get("Secret", namespace, name)
        if not secret or key not in (secret.get("data") or {}):
            return None
        return base64.b64decode(secret["data"][key]).decode()


def _contains(current: Any, wanted: Any) -> bool:
    """Whether every field we set already has our value (server defaults may add more)."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(
            _contains(current.get(key), value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(current, list)
            and len(current) == len(wanted)
            and all(_contains(c, w) for c, w in zip(current, wanted, strict=True))
        )
    return current == wanted or (isinstance(wanted, int) and str(wanted) == str(current))
