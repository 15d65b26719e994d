"""A minimal Kubernetes REST client for the local node agent (stdlib + pyyaml).

Just what a kubelet-like agent needs: JSON requests, merge patches and a watch stream, with the
token + CA kubeconfigs the local control plane writes. Every request opens its own connection, so
one client is safe to share between threads.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MERGE_PATCH = "application/merge-patch+json"


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeClient:
    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        current = config["current-context"]
        context = _named(config["contexts"], current)["context"]
        cluster = _named(config["clusters"], context["cluster"])["cluster"]
        user = _named(config["users"], context["user"])["user"]
        self.server: str = cluster["server"].rstrip("/")
        self.ca_pem: str = _ca_pem(cluster, Path(kubeconfig).parent)
        self._token: str = user.get("token") or Path(user["tokenFile"]).read_text().strip()
        # No proxies: the API server is on the loopback, whatever http(s)_proxy says.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cadata=self.ca_pem)),
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        with self._open(method, path, body, params, content_type, timeout) as response:
            return json.load(response)

    def raw(self, path: str, timeout: float = 10.0) -> bytes:
        """GET a non-JSON endpoint such as /readyz."""
        with self._open("GET", path, None, None, "", timeout) as response:
            return response.read()

    def get(self, path: str, **params: str) -> dict[str, Any] | None:
        """GET a path; None on 404."""
        try:
            return self.request("GET", path, params=params)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def watch(self, path: str, timeout_s: int, **params: str) -> Iterator[dict[str, Any]]:
        """Events of a watch (`{"type", "object"}`) until the server closes it after timeout_s."""
        params = {**params, "watch": "1", "timeoutSeconds": str(timeout_s)}
        with self._open("GET", path, None, params, "", timeout_s + 10) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)

    def _open(
        self,
        method: str,
        path: str,
        body: Any,
        params: dict[str, str] | None,
        content_type: str,
        timeout: float,
    ) -> Any:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read().decode(errors="replace")[:500]) from None


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


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def _ca_pem(cluster: dict[str, Any], base: Path) -> str:
    if "certificate-authority-data" in cluster:
        return base64.b64decode(cluster["certificate-authority-data"]).decode()
    return (base / cluster["certificate-authority"]).read_text()
