"""Small helpers for the end-to-end suite: reading the local cluster the way a user would.

Everything goes through the API server (admin client), the workers' own HTTP endpoints at their
pod addresses, the `-api` Service through its EndpointSlices (there is no kube-proxy: the tests go
where it would route), the local Prometheus' HTTP API, and the node agent's files (pid and logs).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import AppsV1Api, CoreV1Api, CustomObjectsApi

from moe_contract.env import TOKEN_FILE_NAME
from moe_local.cluster import LocalCluster
from moe_local.install import SYSTEM_NAMESPACE, kubectl, wait_until
from moe_local.kube import get_or_none, service_endpoint

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
GROUP, VERSION, PLURAL = "moe-ep.io", "v1alpha1", "moedeployments"
ALERT = "MoEExpertLoadImbalance"


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    try:
        return wait_until(predicate, timeout, what, interval=interval)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None


def http_get(url: str, timeout: float = 3.0, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def metric_value(text: str, name: str) -> float | None:
    """The value of series `name` (with its labels written out, if any) in exposition text."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Outage:
    """Samples the group while a change rolls out: how long no full group was ready, and how
    often each pod name was replaced (distinct uids seen)."""

    e2e: E2E
    interval: float = 0.25
    samples: list[tuple[float, int, dict[str, str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Outage:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                workers = self.e2e.workers()
            except Exception:  # the API server is busy: a gap in the samples, not a failure
                workers = None
            if workers is not None:
                ready = sum(1 for w in workers.values() if w["ready"])
                uids = {name: w["uid"] for name, w in workers.items()}
                self.samples.append((time.monotonic(), ready, uids))
            self._stop.wait(self.interval)

    def seconds_without_group(self) -> float:
        """Time between samples during which fewer than `world` workers were ready."""
        down = 0.0
        for (at, ready, _), (later, _, _) in itertools.pairwise(self.samples):
            if ready < self.e2e.world:
                down += later - at
        return down

    def replacements(self) -> dict[str, int]:
        """pod name -> how many times it was replaced (new uids seen after the first)."""
        seen: dict[str, set[str]] = {}
        for _, _, uids in self.samples:
            for name, uid in uids.items():
                seen.setdefault(name, set()).add(uid)
        return {name: len(uids) - 1 for name, uids in seen.items()}


@dataclass
class E2E:
    """One local cluster with the operator installed and one running MoEDeployment."""

    cluster: LocalCluster
    namespace: str
    name: str
    world: int
    threshold: float
    prometheus_url: str
    models: Path  # the hostPath volume holding the checkpoints
    api_key: str
    core: CoreV1Api = field(init=False)
    apps: AppsV1Api = field(init=False)
    custom: CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        client = self.cluster.client()
        self.core = CoreV1Api(client)
        self.apps = AppsV1Api(client)
        self.custom = CustomObjectsApi(client)

    # -- the MoEDeployment and its children ------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> Any:
        return kubectl(self.kubeconfig, *args, stdin=stdin, check=check)

    def apply(self, document: dict[str, Any], check: bool = True) -> Any:
        return self.kubectl(
            "apply", "-n", self.namespace, "-f", "-", stdin=yaml.safe_dump(document), check=check
        )

    def moed(self, name: str | None = None) -> dict[str, Any] | None:
        read = self.custom.get_namespaced_custom_object
        return get_or_none(read, GROUP, VERSION, self.namespace, PLURAL, name or self.name)

    def child(self, kind: str, name: str) -> Any | None:
        """A child object (StatefulSet, Service, ConfigMap or Secret) in the namespace, or None."""
        read = {
            "StatefulSet": self.apps.read_namespaced_stateful_set,
            "Service": self.core.read_namespaced_service,
            "ConfigMap": self.core.read_namespaced_config_map,
            "Secret": self.core.read_namespaced_secret,
        }[kind]
        return get_or_none(read, name, self.namespace)

    def status(self, name: str | None = None) -> dict[str, Any]:
        return (self.moed(name) or {}).get("status") or {}

    def condition(self, kind: str, name: str | None = None) -> dict[str, Any]:
        for item in self.status(name).get("conditions") or []:
            if item["type"] == kind:
                return item
        return {}

    def plan_key(self, name: str | None = None) -> str | None:
        """The plan ConfigMap's key the StatefulSet's pods map onto plan.json (its shape)."""
        sts = self.child("StatefulSet", name or self.name)
        if sts is None:
            return None
        volume = next(v for v in sts.spec.template.spec.volumes if v.name == "plan")
        return volume.config_map.items[0].key

    def plan_document(self, name: str | None = None) -> dict[str, Any] | None:
        """The plan under the current shape's key, or None (no ConfigMap, no key, not JSON)."""
        cm = self.child("ConfigMap", f"{name or self.name}-plan")
        raw = (cm.data or {}).get(self.plan_key(name) or "") if cm else None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def configmap_version(self) -> int | None:
        document = self.plan_document()
        return int(document["version"]) if document else None

    def control_token(self, name: str | None = None) -> str | None:
        """The deployment's control token (its Secret), which GET /v1/plan needs too."""
        secret = self.child("Secret", f"{name or self.name}-control")
        if secret is None or not secret.data:
            return None
        return base64.b64decode(secret.data[TOKEN_FILE_NAME]).decode().strip()

    def leader_plan(self) -> dict[str, Any] | None:
        code, body = http_get(self.worker_url(0, "/v1/plan"), token=self.control_token())
        return json.loads(body) if code == 200 else None

    def pods(self, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        listing = self.core.list_namespaced_pod(
            namespace or self.namespace,
            label_selector=selector or f"moe-ep.io/deployment={self.name}",
        )
        items = self.core.api_client.sanitize_for_serialization(listing.items)
        return sorted(items, key=lambda pod: pod["metadata"]["name"])

    def workers(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """pod name -> {uid, pid, restarts, ready, ip} of the deployment's worker pods."""
        out = {}
        for pod in self.pods(selector=f"moe-ep.io/deployment={name or self.name}"):
            status = pod.get("status") or {}
            containers = status.get("containerStatuses") or [{}]
            cid = containers[0].get("containerID") or ""
            out[pod["metadata"]["name"]] = {
                "uid": pod["metadata"]["uid"],
                "pid": int(cid.removeprefix("local://")) if cid.startswith("local://") else None,
                "restarts": containers[0].get("restartCount", 0),
                "ready": bool(containers[0].get("ready")),
                "ip": status.get("podIP"),
            }
        return out

    def all_ready(self) -> dict[str, dict[str, Any]] | None:
        workers = self.workers()
        if len(workers) == self.world and all(w["ready"] and w["pid"] for w in workers.values()):
            return workers
        return None

    def worker_url(self, rank: int, path: str) -> str:
        ip = self.workers()[f"{self.name}-{rank}"]["ip"]
        return f"http://{ip}:8080{path}"

    def api_url(self, name: str | None = None) -> str | None:
        """Base URL of the OpenAI-compatible API through the `<name>-api` Service: its ready
        endpoint (the address kube-proxy would route the ClusterIP to), or None."""
        service = f"{name or self.name}-api"
        found = service_endpoint(self.cluster.client(), self.namespace, service)
        return None if found is None else f"http://{found[0]}:{found[1]}/v1"

    def switch_times(self, rank: int = 0) -> list[tuple[int, int, float]]:
        """(from, to, when: seconds since the epoch) of every plan switch `rank` logged; the
        line is written once every rank serves the new plan."""
        pattern = re.compile(
            rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) \S+ \S+: rank {rank} switched "
            rf"plan (\d+) -> (\d+)",
            re.MULTILINE,
        )
        return [
            (int(a), int(b), time.mktime(time.strptime(at, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000)
            for at, ms, a, b in pattern.findall(self.worker_log(rank))
        ]

    def leader_plan_version(self) -> int | None:
        code, body = http_get(self.worker_url(0, "/v1/plan"), token=self.control_token())
        return int(json.loads(body)["version"]) if code == 200 else None

    def worker_plan_versions(self) -> list[float | None]:
        versions = []
        for rank in range(self.world):
            try:
                code, body = http_get(self.worker_url(rank, "/metrics"))
            except OSError:
                versions.append(None)
                continue
            versions.append(
                metric_value(body, f'moe_plan_version{{rank="{rank}"}}') if code == 200 else None
            )
        return versions

    def pod_dir(self, pod: dict[str, Any]) -> Path:
        meta = pod["metadata"]
        return self.cluster.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"

    def worker_log(self, rank: int) -> str:
        """rank's log over every pod incarnation of that name, oldest first (a recreated pod has a
        new uid, so its directory sorts anywhere by name: order by last write instead)."""
        pattern = f"pods/{self.namespace}_{self.name}-{rank}_*/logs/*.log"
        paths = sorted(self.cluster.workdir.glob(pattern), key=lambda path: path.stat().st_mtime)
        return "".join(path.read_text(errors="replace") for path in paths)

    def switches(self, rank: int = 0) -> list[tuple[int, int]]:
        """(from, to) of every plan switch rank `rank` logged, in order."""
        pattern = re.compile(rf"rank {rank} switched plan (\d+) -> (\d+)")
        return [(int(a), int(b)) for a, b in pattern.findall(self.worker_log(rank))]

    # -- the operator ----------------------------------------------------------------------

    def operator_pod(self) -> dict[str, Any]:
        pods = self.pods(SYSTEM_NAMESPACE, "app.kubernetes.io/component=operator")
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    def operator_metric(self, name: str, labels: str = "") -> float | None:
        """A sample of the operator's own /metrics (at its pod IP: it binds nothing else)."""
        ip = (self.operator_pod().get("status") or {}).get("podIP")
        try:
            code, body = http_get(f"http://{ip}:9090/metrics")
        except OSError:
            return None
        return metric_value(body, name + labels) if code == 200 else None

    def timer_runs(self) -> float:
        """Timer runs the operator finished (over all objects), from its own histogram."""
        count = self.operator_metric("moe_operator_reconcile_seconds_count", '{handler="refresh"}')
        return count or 0.0

    def wait_timer_runs(self, runs: int = 4, timeout: float = 60) -> None:
        """Wait for `runs` more timer runs: 'a few reconciliations later', without a clock."""
        start = self.timer_runs()
        wait_for(f"{runs} timer runs", lambda: self.timer_runs() >= start + runs, timeout)

    def operator_rss_mb(self) -> float:
        pid = wait_for("operator Ready", self.operator_pid, 30)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def operator_pid(self) -> int | None:
        containers = (self.operator_pod().get("status") or {}).get("containerStatuses") or [{}]
        cid = containers[0].get("containerID") or ""
        ready = containers[0].get("ready")
        return int(cid.removeprefix("local://")) if ready and cid.startswith("local://") else None

    # -- Prometheus ------------------------------------------------------------------------

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        code, body = http_get(f"{self.prometheus_url}/api/v1/alerts")
        assert code == 200, body
        return [
            alert
            for alert in json.loads(body)["data"]["alerts"]
            if alert["labels"].get("alertname") == ALERT
            and alert["labels"].get("moedeployment") == self.name
            and alert["state"] == state
        ]


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (a pod's launcher: its ranks, local rank 0 first)."""
    return sorted(
        int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    )


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")
