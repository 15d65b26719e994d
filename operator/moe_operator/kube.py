"""The operator's few calls to the Kubernetes API, behind one small class.

Handlers decide; this module only talks. Objects go in and out as plain dicts (the shape the pure
builders produce), so nothing else in the operator depends on the client's model classes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from moe_operator import api
from moe_operator.manifests import podspec

MERGE_PATCH = "application/merge-patch+json"


class Conflict(RuntimeError):
    """A write lost a race (resourceVersion or uid precondition, or the name was taken): read
    again and decide again."""


def load_client_config() -> None:
    """In a pod: its ServiceAccount; elsewhere: KUBECONFIG (as kopf itself does)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Cluster:
    """Read, create and patch children; write a MoEDeployment's status."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self._client = api_client or kubernetes.client.ApiClient()
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._apps = kubernetes.client.AppsV1Api(self._client)
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._rbac = kubernetes.client.RbacAuthorizationV1Api(self._client)
        self._pdb_version: str | None = None

    @staticmethod
    def _raw(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The object as the API server sent it: plain JSON, no typed models (they refuse
        objects they cannot model, such as a partial one someone else created)."""
        response = call(*args, _preload_content=False, **kwargs)
        return response if isinstance(response, dict) else json.loads(response.data)

    def _client_of(self, kind: str) -> tuple[Any, str]:
        """The typed client of `kind` and its snake-case name in method names."""
        client = {
            "StatefulSet": self._apps,
            "Deployment": self._apps,
            "Role": self._rbac,
            "RoleBinding": self._rbac,
        }.get(kind, self._core)
        snake = {
            "StatefulSet": "stateful_set",
            "ConfigMap": "config_map",
            "ServiceAccount": "service_account",
            "RoleBinding": "role_binding",
        }.get(kind, kind.lower())
        return client, snake

    def _calls(self, kind: str) -> tuple[Any, Any, Any]:
        if kind == "PodDisruptionBudget":
            return self._pdb_calls()
        client, snake = self._client_of(kind)
        return (
            getattr(client, f"read_namespaced_{snake}"),
            getattr(client, f"create_namespaced_{snake}"),
            getattr(client, f"patch_namespaced_{snake}"),
        )

    def pdb_api_version(self) -> str:
        """The PodDisruptionBudget version the API server serves (discovery, asked once):
        policy/v1 from Kubernetes 1.21, policy/v1beta1 before (the local cluster's 1.20)."""
        if self._pdb_version is None:
            group = self._request("GET", "/apis/policy")
            served = {item.get("groupVersion") for item in group.get("versions") or []}
            self._pdb_version = next(
                (version for version in podspec.PDB_API_VERSIONS if version in served), None
            )
            if self._pdb_version is None:
                raise RuntimeError(f"the API server serves no PodDisruptionBudget ({served})")
        return self._pdb_version

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        """One call by path, for what the typed client lacks (policy/v1beta1 is gone from it)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self._client.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._client.call_api(*request)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return json.loads(data)

    def _pdb_calls(self) -> tuple[Any, Any, Any]:
        base = f"/apis/{self.pdb_api_version()}/namespaces/{{}}/poddisruptionbudgets"
        return (
            lambda name, ns, **_: self._request("GET", f"{base.format(ns)}/{name}"),
            lambda ns, body, **_: self._request("POST", base.format(ns), body),
            lambda name, ns, body, **_: self._request(
                "PATCH", f"{base.format(ns)}/{name}", body, MERGE_PATCH
            ),
        )

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read, _, _ = self._calls(kind)
        try:
            return self._raw(read, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Raises Conflict when the name is taken meanwhile."""
        _, create, _ = self._calls(body["kind"])
        try:
            return self._raw(create, namespace, body)
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"{body['kind']} {body['metadata']['name']} exists") from None
            raise

    def patch(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch: lists (containers, env) are replaced whole, as the builder wants.

        A `metadata.resourceVersion` in `body` is a precondition: Conflict if the object
        changed since it was read.
        """
        _, _, patch = self._calls(body["kind"])
        try:
            return self._raw(
                patch, body["metadata"]["name"], namespace, body, _content_type=MERGE_PATCH
            )
        except ApiException as error:
            if error.status in (404, 409):
                raise Conflict(f"{body['kind']} {body['metadata']['name']} changed") from None
            raise

    def ensure(
        self, namespace: str, body: dict[str, Any], current: dict[str, Any] | None
    ) -> tuple[str, dict[str, Any]]:
        """Create `body`, or merge-patch `current` (as read) into it when a field we set differs.
        Returns ("created" | "updated" | "unchanged", the object as stored). No resourceVersion
        precondition: the patch sets only our fields, and controllers update these objects'
        status all the time (the plan record, which is decided from what was read, has one)."""
        if current is None:
            return "created", self.create(namespace, without_nulls(body))
        if contains(current, body):
            return "unchanged", current
        return "updated", self.patch(namespace, body)

    def list_statefulsets(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        found = self._raw(
            self._apps.list_namespaced_stateful_set, namespace, label_selector=label_selector
        )
        return _typed(found, "apps/v1", "StatefulSet")

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> bool:
        """Delete one child if it is still the one seen (uid); its pods go with it (background
        propagation). False if it is gone or replaced."""
        options = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        try:
            if kind == "PodDisruptionBudget":
                base = f"/apis/{self.pdb_api_version()}/namespaces/{namespace}"
                self._request("DELETE", f"{base}/poddisruptionbudgets/{name}", options)
            else:
                client, snake = self._client_of(kind)
                getattr(client, f"delete_namespaced_{snake}")(name, namespace, body=options)
        except ApiException as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    def label_pod(self, namespace: str, pod: dict[str, Any], labels: dict[str, Any]) -> bool:
        """Merge `labels` into a pod's (None removes one), if it is still the one seen."""
        meta = pod["metadata"]
        body = {"metadata": {"uid": meta["uid"], "labels": labels}}
        try:
            self._core.patch_namespaced_pod(
                meta["name"], namespace, body, _content_type=MERGE_PATCH
            )
        except ApiException as error:
            if error.status in (404, 409, 422):
                return False
            raise
        return True

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        pods = self._raw(self._core.list_namespaced_pod, namespace, label_selector=label_selector)
        return _typed(pods, "v1", "Pod")

    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete one pod if it is still the one seen (uid); False if it is gone or replaced."""
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid)
        )
        try:
            self._core.delete_namespaced_pod(name, namespace, body=options)
        except ApiException as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch a MoEDeployment's status subresource; returns the stored status."""
        stored = self._raw(
            self._custom.patch_namespaced_custom_object_status,
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            {"status": status},
            _content_type=MERGE_PATCH,
        )
        return dict(stored.get("status") or {})


def secret_value(secret: dict[str, Any] | None, key: str) -> str | None:
    """A key of a Secret as read (base64 in `data`), or None."""
    data = (secret or {}).get("data") or {}
    if key not in data:
        return None
    return base64.b64decode(data[key]).decode()


def without_nulls(body: Any) -> Any:
    """`body` less the keys a merge patch would remove (None): what a create sends."""
    if isinstance(body, dict):
        return {key: without_nulls(value) for key, value in body.items() if value is not None}
    if isinstance(body, list):
        return [without_nulls(item) for item in body]
    return body


def _typed(found: dict[str, Any], api_version: str, kind: str) -> list[dict[str, Any]]:
    """A list's items as `get` returns objects: the API server leaves apiVersion and kind out
    of list items, and a StatefulSet compared with what the spec builds needs them."""
    return [{"apiVersion": api_version, "kind": kind, **item} for item in found.get("items") or []]


def contains(current: Any, wanted: Any) -> bool:
    """Whether every field we set already has our value (server defaults may add more). A map
    we only remove keys from is satisfied by its absence: the API server drops the empty
    `annotations` a merge patch of {key: null} leaves, so a missing map is an empty one."""
    if isinstance(wanted, dict):
        current = {} if current is None else current
        return isinstance(current, dict) and all(
            key not in current if value is None else contains(current.get(key), value)
            for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(current, list)
            and len(current) == len(wanted)
            and all(contains(c, w) for c, w in zip(current, wanted, strict=True))
        )
    return current == wanted or (isinstance(wanted, int) and str(wanted) == str(current))
