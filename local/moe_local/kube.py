"""The local tooling's way to the Kubernetes API: the official client, set up for the local plane.

    client = api_client(kubeconfig)
    node = get_or_none(CoreV1Api(client).read_node, "moe-local")   # a model; None on 404
    client.sanitize_for_serialization(node)   # a plain dict, camelCase keys as the API sends

Plus the token kubeconfig the node agent writes for each pod (a file, not a client).
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi
from kubernetes.client.rest import ApiException

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
"""Lists (conditions, containerStatuses) are replaced whole, as the node agent means them."""
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
"""What a call raises when the API server refuses it or cannot be reached."""


def api_client(kubeconfig: Path) -> ApiClient:
    """A client of the kubeconfig's current context (its own configuration, not the global one:
    a test holds several users of several clusters at once)."""
    configuration = Configuration()
    # The API server is on the loopback: no proxy, whatever http(s)_proxy says.
    configuration.proxy = None
    # One client serves all the node agent's threads (heartbeat, watch, one per pod): keep a
    # connection per thread instead of discarding (and warning about) the overflow.
    configuration.connection_pool_maxsize = 64
    return kubernetes.config.new_client_from_config(
        config_file=str(kubeconfig), client_configuration=configuration
    )


def get_or_none(read: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`read(*args, **kwargs)`, or None when the object does not exist (404)."""
    try:
        return read(*args, **kwargs)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def service_endpoint(
    client: ApiClient, namespace: str, service: str, port: str = "http"
) -> tuple[str, int] | None:
    """(address, port) of a ready endpoint of a Service, from its EndpointSlices: where
    kube-proxy (which reads EndpointSlices since 1.19) would send a connection to the Service's
    ClusterIP. The local cluster has no kube-proxy, so tools reach a Service this way, and only
    while it has a ready endpoint. Not through the Endpoints object: its validation refuses
    loopback addresses, and every pod address here is one (EndpointSlices take them)."""
    custom = CustomObjectsApi(client)
    selector = f"kubernetes.io/service-name={service}"
    for version in ("v1", "v1beta1"):  # v1 from Kubernetes 1.21; the local 1.20 has v1beta1
        try:
            slices = custom.list_namespaced_custom_object(
                "discovery.k8s.io", version, namespace, "endpointslices", label_selector=selector
            )
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        for item in slices.get("items") or []:
            ports = item.get("ports") or []
            number = next((p["port"] for p in ports if p.get("name") == port), None)
            if number is None and len(ports) == 1:
                number = ports[0]["port"]
            for endpoint in item.get("endpoints") or []:
                ready = (endpoint.get("conditions") or {}).get("ready") is not False
                if number is not None and ready and endpoint.get("addresses"):
                    return endpoint["addresses"][0], int(number)
        return None
    return None


def readyz(client: ApiClient, timeout_s: float = 3.0) -> bool:
    """The API server's /readyz says ok (no typed API serves it)."""
    method, url, headers, _, _ = client.param_serialize(
        "GET", "/readyz", auth_settings=["BearerToken"]
    )
    response = client.call_api(method, url, headers, _request_timeout=timeout_s)
    response.read()
    return response.status == 200 and (response.data or b"").strip() == b"ok"


def write_token_kubeconfig(
    path: Path, server: str, ca_pem: str, token: str, user: str, namespace: str
) -> None:
    """A kubeconfig that authenticates with a bearer token (JSON is valid YAML)."""
    ca_data = base64.b64encode(ca_pem.encode()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "local", "context": {"cluster": "local", "user": user, "namespace": namespace}}
        ],
        "current-context": "local",
    }
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        json.dump(config, tmp, indent=2)
    Path(tmp.name).chmod(0o600)
    Path(tmp.name).replace(path)
