"""How the local node agent maps a pod's spec onto a local process (pure, except `pod_ip`'s hash).

A container becomes: argv (command + args, `$(VAR)` expanded), an environment (values, fieldRefs,
secret/configMap keys), and paths: every volumeMount's mountPath is a directory under the pod's
own directory, so env values and args that point under a mountPath are rewritten to it. The pod
network is the loopback: each pod gets its own 127.x.y.z, chosen from its name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"

# <pod>.<service>.<namespace>.svc[.cluster.local]: a StatefulSet pod through its headless Service.
_POD_DNS = re.compile(
    r"(?<![\w.-])([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
    r"\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.svc(?:\.cluster\.local)?(?![\w-])"
)
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")

# The decoded data of ConfigMap or Secret `name` (kind "configmap" | "secret"); None if absent.
DataLookup = Callable[[str, str], dict[str, str] | None]


def pod_ip(namespace: str, name: str, cluster: str = "") -> str:
    """The pod's loopback address, a pure function of its name: peers know rank 0's in advance.

    `cluster` (the local cluster's work directory) keeps two local clusters on one machine, say
    two test runs, from giving the same pod name the same address. 127.0.x.x is left to the
    control plane; last octets 0 and 255 are avoided. With 16 million addresses a collision among
    a few dozen pods is about as likely as a cosmic-ray bit flip.
    """
    digest = hashlib.sha256(f"{cluster}/{namespace}/{name}".encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"


def resolve_cluster_names(text: str, cluster: str = "") -> str:
    """Replace `<pod>.<service>.<ns>.svc` names by that pod's loopback address (no DNS here)."""
    return _POD_DNS.sub(lambda m: pod_ip(m.group(2), m.group(1), cluster), text)


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: unknown references stay as written, `$$` escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


@dataclass(frozen=True)
class Mounts:
    """A container's mountPaths and the local directories standing in for them."""

    paths: tuple[tuple[str, Path], ...]  # longest mountPath first, so nested mounts win

    @classmethod
    def of(cls, container: dict[str, Any], volume_dirs: Mapping[str, Path]) -> Mounts:
        pairs = []
        for mount in container.get("volumeMounts") or []:
            local = volume_dirs.get(mount["name"])
            if local is not None:
                local = local / mount["subPath"] if mount.get("subPath") else local
                pairs.append((mount["mountPath"].rstrip("/") or "/", local))
        pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
        return cls(tuple(pairs))

    def rewrite(self, text: str) -> str:
        """Point paths under a mountPath at the local directory (whole path components only)."""
        for mount_path, local in self.paths:
            pattern = rf"(?<![\w./-]){re.escape(mount_path)}(?=/|$|[^\w.-])"
            text = re.sub(pattern, lambda _m, local=local: str(local), text)
        return text

    def local(self, mount_path: str) -> Path | None:
        return dict(self.paths).get(mount_path)


def field_value(pod: dict[str, Any], field_path: str, ip: str, host_ip: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": ip,
        "status.hostIP": host_ip,
    }
    if field_path in simple:
        return simple[field_path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    raise ValueError(f"unsupported fieldRef {field_path!r}")


def container_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    ip: str,
    host_ip: str,
    lookup: DataLookup,
) -> dict[str, str]:
    """The container's environment as Kubernetes defines it (envFrom, then env in order).

    Raises KeyError for a missing non-optional key, as the kubelet refuses to start then.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref_key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = source.get(ref_key)
            if ref:
                data = lookup(kind, ref["name"])
                if data is None and not ref.get("optional"):
                    raise KeyError(f"{kind} {ref['name']} not found")
                env.update({prefix + key: value for key, value in (data or {}).items()})
    for item in container.get("env") or []:
        value = _env_value(pod, item, env, ip, host_ip, lookup)
        if value is not None:
            env[item["name"]] = value
    return env


def _env_value(
    pod: dict[str, Any],
    item: dict[str, Any],
    env: dict[str, str],
    ip: str,
    host_ip: str,
    lookup: DataLookup,
) -> str | None:
    if "valueFrom" not in item:
        return expand_vars(item.get("value", ""), env)
    source = item["valueFrom"]
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"], ip, host_ip)
    for kind, ref_key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
        if ref_key in source:
            ref = source[ref_key]
            value = (lookup(kind, ref["name"]) or {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise KeyError(f"{kind} {ref['name']} has no key {ref['key']!r}")
            return value
    return None  # resourceFieldRef: no cgroup limits here
