"""The local node agent: a kubelet stand-in that runs pods as local processes (test/demo tooling).

    python -m moe_local.nodeagent --kubeconfig K --node-name moe-local --workdir D

Registers a Node with GPU capacity and keeps its Ready condition fresh, watches the pods bound to it
and hands each to a `PodRunner` (podrunner.py: processes, volumes, status, Prometheus targets).
A deleted pod's processes are stopped and then the object is deleted with grace period 0, as a
kubelet would. On SIGTERM every child process is killed. It listens on nothing.
What it does not do: images (the container's command runs from the agent's venv), resource
limits, init containers, exec/logs/port-forward, Services (pod DNS names are rewritten to
loopback addresses instead); see docs/local.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.rest import ApiException
from kubernetes.watch import Watch

from moe_local.kube import API_ERRORS, MERGE_PATCH, api_client, get_or_none
from moe_local.podprocess import kill_group, now_rfc3339
from moe_local.podrunner import PodRunner

log = logging.getLogger("moe_local.nodeagent")

KUBELET_VERSION = "v1.20.2-moe-ep-local"


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = "moe-local"
    workdir: Path = Path(".")
    """pods/<ns>_<name>_<uid>/ and prometheus/targets/ are written under it."""
    gpus: int = 16
    """`nvidia.com/gpu` capacity; only the scheduler cares, no GPU is attached to processes."""
    cpus: str = "64"
    """Advertised CPU capacity: a scheduling fiction large enough for the demo's requests."""
    memory: str = "256Gi"
    heartbeat_s: float = 10.0
    volume_sync_s: float = 2.0
    """How often ConfigMap/Secret volume files are refreshed (a kubelet takes up to a minute)."""
    backoff_s: tuple[float, float] = (1.0, 30.0)
    """Restart back-off: first delay and cap (a kubelet uses 10 s and 5 min)."""
    shutdown_grace_s: float = 5.0
    """On agent shutdown, SIGTERM -> SIGKILL delay per pod (at most the pod's own grace)."""


class NodeAgent:
    def __init__(self, client: ApiClient, config: AgentConfig) -> None:
        self.client = client
        self.core = CoreV1Api(client)
        self.config = config
        self.workdir = config.workdir.resolve()
        self.stopping = threading.Event()
        self._runners: dict[str, PodRunner] = {}  # by pod UID
        self._lock = threading.Lock()

    def run(self) -> None:
        """Register, then serve until `stopping` is set; always kills every child on the way out."""
        self.register_node()
        watcher = threading.Thread(target=self._watch_forever, name="pod-watch", daemon=True)
        watcher.start()
        try:
            while not self.stopping.wait(self.config.heartbeat_s):
                self._post_node_status(ready=True)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.shutdown(self.config.shutdown_grace_s)
        for runner in runners:
            runner.join(self.config.shutdown_grace_s + 5)
            for pid in runner.pids():  # a runner that hung: its processes go anyway
                kill_group(pid, signal.SIGKILL)
        try:
            self._post_node_status(ready=False)
        except API_ERRORS as err:
            log.info("could not mark node NotReady: %s", err)

    # -- node --------------------------------------------------------------------------------

    def register_node(self) -> None:
        name = self.config.node_name
        if get_or_none(self.core.read_node, name) is None:
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "moe-ep.io/local-node": "true",
            }
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
            }
            self.core.create_node(node)
        self._post_node_status(ready=True)
        log.info("node %s registered (%d GPUs)", name, self.config.gpus)

    def _post_node_status(self, ready: bool) -> None:
        c = self.config
        resources = {
            "cpu": c.cpus,
            "memory": c.memory,
            "pods": "110",
            "nvidia.com/gpu": str(c.gpus),
        }
        now = now_rfc3339()
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHas{reason}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for kind, reason in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "AgentStopped",
                "message": "moe-ep local node agent" + ("" if ready else " stopped"),
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        )
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": c.node_name},
            ],
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": platform.machine(),
                "containerRuntimeVersion": "local://process",
                "osImage": platform.platform(),
                "kernelVersion": platform.release(),
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.core.patch_node_status(c.node_name, {"status": status}, _content_type=MERGE_PATCH)

    # -- pods --------------------------------------------------------------------------------

    def _watch_forever(self) -> None:
        selector = f"spec.nodeName={self.config.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                self._resync(self.client.sanitize_for_serialization(listing.items))
                events = Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=30,
                    _request_timeout=40,
                )
                for event in events:
                    if self.stopping.is_set():
                        break
                    # The pod as the API server sent it: PodRunner works on plain dicts.
                    self._handle(event["type"], event["raw_object"])
            except ApiException as err:
                if err.status != 410:  # 410 Gone: the watch's version expired; just relist
                    self._relist_after(err)
            except Exception as err:  # the watch must outlive any one bad event or response
                self._relist_after(err)

    def _relist_after(self, err: Exception) -> None:
        if not self.stopping.is_set():
            log.warning("pod watch: %r; relisting", err)
            time.sleep(1.0)

    def _resync(self, pods: list[dict[str, Any]]) -> None:
        present = {pod["metadata"]["uid"] for pod in pods}
        with self._lock:
            vanished = [r for uid, r in self._runners.items() if uid not in present]
        for runner in vanished:
            runner.gone()
        for pod in pods:
            self._handle("MODIFIED", pod)

    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            self._runners = {u: r for u, r in self._runners.items() if r.is_alive()}
            runner = self._runners.get(uid)
            if kind == "DELETED":
                if runner is not None:
                    runner.gone()
                return
            if runner is not None:
                runner.update(pod)
                return
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before this agent started; nothing to run
            if self.stopping.is_set():
                return
            if pod["metadata"].get("deletionTimestamp"):
                self._delete_unstarted(pod)  # never started here: nothing to stop
                return
            runner = PodRunner(
                pod,
                self.client,
                self.workdir,
                after=self._same_name(pod),
                volume_sync_s=self.config.volume_sync_s,
                backoff=self.config.backoff_s,
            )
            self._runners[uid] = runner
        log.info("pod %s/%s bound here: starting", pod["metadata"]["namespace"], runner.pod_name)
        runner.start()

    def _same_name(self, pod: dict[str, Any]) -> PodRunner | None:
        meta = pod["metadata"]
        for runner in self._runners.values():
            if (runner.namespace, runner.pod_name) == (meta["namespace"], meta["name"]):
                return runner
        return None

    def _delete_unstarted(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", meta["namespace"], meta["name"], err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_local.nodeagent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", default=AgentConfig.node_name)
    parser.add_argument("--gpus", type=int, default=AgentConfig.gpus)
    parser.add_argument("--cpus", default=AgentConfig.cpus)
    parser.add_argument("--memory", default=AgentConfig.memory)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s",
    )
    config = AgentConfig(
        node_name=args.node_name,
        workdir=args.workdir,
        gpus=args.gpus,
        cpus=args.cpus,
        memory=args.memory,
    )
    agent = NodeAgent(api_client(args.kubeconfig), config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    log.info("node agent pid %d, workdir %s", os.getpid(), agent.workdir)
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
