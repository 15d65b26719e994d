"""One pod on the local node: its directory, volumes, containers, status and Prometheus target.

A `PodRunner` is a thread per pod UID. The node agent feeds it the pod object as it changes; it
owns everything under `<workdir>/pods/<namespace>_<name>_<uid>/`:
    volumes/<volume>/...   ConfigMap/Secret files (re-synced every few seconds), emptyDirs
    read-only/<volume>     where a container sees a readOnly hostPath mount (a read-only bind)
    termination/<container>  the file at the container's terminationMessagePath
    kubeconfig             ServiceAccount token kubeconfig, when the SA token is mounted
    logs/<container>.log   stdout+stderr (there is no `kubectl logs` without a kubelet server)
    logs/<container>.pid   the running process, for `moe-ep local down`'s safety net
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import signal
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.rest import ApiException

from moe_local.kube import MERGE_PATCH, get_or_none
from moe_local.kube import write_token_kubeconfig as _write_kubeconfig
from moe_local.podprocess import (
    ContainerProcess,
    Launch,
    ReadOnlyBind,
    kill_group,
    now_rfc3339,
    read_only_binds_available,
)
from moe_local.podspec import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    SA_MOUNT_PATH,
    Mounts,
    container_env,
    expand_vars,
    host_path_problem,
    pod_ip,
    resolve_cluster_names,
    unsupported_volume,
)

log = logging.getLogger("moe_local.nodeagent")

DEPLOYMENT_LABEL = "moe-ep.io/deployment"
BIN_DIR = Path(sysconfig.get_path("scripts"))
"""Where container commands are looked up first: the venv that runs the agent."""
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write if changed (rename: readers never see half a file); True when written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
        tmp.write(data)
    Path(tmp.name).chmod(mode)
    Path(tmp.name).replace(path)
    return True


def scrape_job(pod: dict[str, Any]) -> str:
    """The file_sd job a scraped pod belongs to; the local Prometheus config globs these names."""
    labels = pod["metadata"].get("labels") or {}
    if DEPLOYMENT_LABEL in labels:
        return "moe-ep-workers"
    if labels.get("app.kubernetes.io/component") == "operator":
        return "moe-ep-operator"
    return "pods"


class PodRunner(threading.Thread):
    def __init__(
        self,
        pod: dict[str, Any],
        client: ApiClient,
        workdir: Path,
        *,
        after: PodRunner | None = None,
        volume_sync_s: float = 2.0,
        backoff: tuple[float, float] = (1.0, 30.0),
        host_ip: str = "127.0.0.1",
    ) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self._cluster = str(workdir)  # one local cluster's pod addresses, not another's
        self.ip = pod_ip(self.namespace, self.pod_name, self._cluster)
        self.client = client
        self.core = CoreV1Api(client)
        self.dir = workdir / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.targets_dir = workdir / "prometheus" / "targets"
        self._after = after  # a previous pod of the same name must free the address first
        self._host_ip = host_ip
        self._volume_sync_s = volume_sync_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_reason: str | None = None  # "deleted" | "gone" | "shutdown"
        self._shutdown_grace = 5.0
        self._volume_dirs: dict[str, Path] = {}
        self._host_paths: dict[str, Path] = {}  # hostPath volumes: name -> the host's path
        self._volume_files: dict[str, set[str]] = {}
        self._volume_problem: tuple[str, str] | None = ("ContainerCreating", "")
        self._kubeconfig: Path | None = None
        self._start_time = (pod.get("status") or {}).get("startTime") or now_rfc3339()
        self._transitions: dict[str, tuple[str, str]] = {}
        self._published: dict[str, Any] | None = None
        self._target: Path | None = None
        policy = pod["spec"].get("restartPolicy", "Always")
        previous = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses", [])}
        self.containers = [
            ContainerProcess(
                spec,
                policy,
                self.dir / "logs",
                backoff,
                # A container this agent never started ran before (an earlier agent): a restart.
                _previous_restarts(previous.get(spec["name"])),
            )
            for spec in pod["spec"]["containers"]
        ]

    # -- called by the node agent ------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        with self._lock:
            self.pod = pod
            if pod["metadata"].get("deletionTimestamp") and self._stop_reason is None:
                self._stop_reason = "deleted"
        self._wake.set()

    def gone(self) -> None:
        with self._lock:
            self._stop_reason = self._stop_reason or "gone"
        self._wake.set()

    def shutdown(self, grace_s: float) -> None:
        """The agent is stopping: kill the processes, leave the pod object alone."""
        with self._lock:
            self._stop_reason, self._shutdown_grace = "shutdown", grace_s
        self._wake.set()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.containers if c.proc is not None]

    # -- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        if self._after is not None:
            self._after.join()
        next_sync = 0.0
        try:
            while self._stop_reason is None:
                now = time.monotonic()
                if now >= next_sync:
                    self._volume_problem = self._sync_volumes()
                    next_sync = now + self._volume_sync_s
                if self._volume_problem is None:
                    for container in self.containers:
                        container.step(lambda c=container: self._launch(c.spec))
                else:
                    for container in self.containers:
                        if container.proc is None and container.last_terminated is None:
                            container.waiting = self._volume_problem
                self._publish_status()
                self._write_target()
                self._wake.wait(0.25)
                self._wake.clear()
        except Exception:
            log.exception("pod %s/%s: runner failed", self.namespace, self.pod_name)
        finally:
            self._terminate()

    def _terminate(self) -> None:
        grace = self._grace_s()
        for container in self.containers:  # SIGTERM all first, then wait: one grace period
            if container.proc is not None:
                kill_group(container.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for container in self.containers:
            container.stop(max(0.0, deadline - time.monotonic()))
        if self._target is not None:
            self._target.unlink(missing_ok=True)
        if self._stop_reason == "deleted":
            self._delete_pod()
        log.info("pod %s/%s stopped (%s)", self.namespace, self.pod_name, self._stop_reason)

    def _grace_s(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        if self._stop_reason == "shutdown":
            grace = min(grace, self._shutdown_grace)
        return float(grace)

    def _delete_pod(self) -> None:
        # What a kubelet does once the containers are gone: the object may now disappear.
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            self.core.delete_namespaced_pod(self.pod_name, self.namespace, body=body)
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", self.namespace, self.pod_name, err)

    # -- volumes and launch ------------------------------------------------------------------

    def _sync_volumes(self) -> tuple[str, str] | None:
        """Write ConfigMap/Secret files; (waiting reason, message) while the pod cannot start:
        a volume kind the agent cannot provide, a required object missing, a hostPath check."""
        problem: tuple[str, str] | None = None
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            local = self.dir / "volumes" / name
            refused = unsupported_volume(volume)
            if refused is not None:
                problem = problem or ("VolumeNotSupported", refused)
                continue
            if "hostPath" in volume:
                failed = host_path_problem(volume["hostPath"])
                if failed is not None:
                    problem = problem or ("ContainerCreating", f"volume {name!r}: {failed}")
                self._volume_dirs[name] = self._host_paths[name] = Path(volume["hostPath"]["path"])
                continue
            self._volume_dirs[name] = local
            local.mkdir(parents=True, exist_ok=True)
            source = volume.get("configMap") or volume.get("secret")
            if source is None:
                continue  # emptyDir: an empty directory
            kind = "configmap" if "configMap" in volume else "secret"
            source_name = source.get("name") or source.get("secretName", "")
            data = self._lookup(kind, source_name)
            if data is None:
                if not source.get("optional"):
                    missing = f"volume {name!r}: {kind} {source_name} not found"
                    problem = problem or ("ContainerCreating", missing)
                continue
            self._write_volume(name, local, data, source.get("items"), kind)
        return problem

    def _write_volume(
        self, name: str, local: Path, data: dict[str, str], items: Any, kind: str
    ) -> None:
        files = {item["path"]: data[item["key"]] for item in items or [] if item["key"] in data}
        files = files if items else data
        mode = 0o600 if kind == "secret" else 0o644  # secrets stay private to this user
        for path, value in files.items():
            atomic_write(local / path, value.encode(), mode)
        for stale in self._volume_files.get(name, set()) - set(files):
            (local / stale).unlink(missing_ok=True)  # a key removed from the ConfigMap
        self._volume_files[name] = set(files)

    def _lookup(self, kind: str, name: str) -> dict[str, str] | None:
        if kind == "configmap":
            read: Any = self.core.read_namespaced_config_map
        else:
            read = self.core.read_namespaced_secret
        found = get_or_none(read, name, self.namespace)
        if found is None:
            return None
        obj = self.client.sanitize_for_serialization(found)  # base64 values, as the API sends
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        binary = {k: base64.b64decode(v).decode() for k, v in (obj.get("binaryData") or {}).items()}
        return {**(obj.get("data") or {}), **binary}

    def _read_only_views(self, spec: dict[str, Any]) -> tuple[dict[str, Path], list[ReadOnlyBind]]:
        """Volume directories for this container: a hostPath mounted readOnly is seen through a
        read-only bind of the host path onto a directory of the pod's own."""
        dirs, binds = dict(self._volume_dirs), []
        for mount in spec.get("volumeMounts") or []:
            host = self._host_paths.get(mount["name"])
            if host is None or not mount.get("readOnly") or not read_only_binds_available():
                continue
            view = self.dir / "read-only" / mount["name"]
            if host.is_dir():
                view.mkdir(parents=True, exist_ok=True)
            else:
                view.parent.mkdir(parents=True, exist_ok=True)
                view.touch(exist_ok=True)
            binds.append((str(host), str(view)))
            dirs[mount["name"]] = view
        return dirs, binds

    def _launch(self, spec: dict[str, Any]) -> Launch:
        volume_dirs, binds = self._read_only_views(spec)
        # A fresh termination message file for each start, as a kubelet gives each instance;
        # the container finds it where it looks (env values naming the path are rewritten).
        message_file = self.dir / "termination" / spec["name"]
        message_file.parent.mkdir(parents=True, exist_ok=True)
        message_file.write_bytes(b"")
        message_path = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        mounts = Mounts.of(spec, volume_dirs, {message_path: message_file})
        pod_env = container_env(
            self.pod, spec, ip=self.ip, host_ip=self._host_ip, lookup=self._lookup
        )
        env = {
            "PATH": f"{BIN_DIR}:{SYSTEM_PATH}",
            "HOME": str(self.dir / "home"),
            "TMPDIR": str(self.dir / "tmp"),
            "HOSTNAME": self.pod_name,
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        resolve = functools.partial(resolve_cluster_names, cluster=self._cluster)
        env.update({k: mounts.rewrite(resolve(v)) for k, v in pod_env.items()})
        env["MOE_BIND_ADDRESS"] = self.ip  # the node's fact, whatever the pod asked for
        # The pod network is the loopback, whatever interface the pod names for a real node
        # (spec.worker.network.socketInterface): gloo would otherwise pick the hostname's address.
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = "lo"
        sa_dir = mounts.local(SA_MOUNT_PATH)
        if sa_dir is not None and "KUBECONFIG" not in pod_env:
            env["KUBECONFIG"] = str(self._sa_kubeconfig(sa_dir))
        for key in ("HOME", "TMPDIR"):
            Path(env[key]).mkdir(parents=True, exist_ok=True)
        command = [expand_vars(part, env) for part in spec.get("command") or []]
        args = [expand_vars(part, env) for part in spec.get("args") or []]
        if not command:
            raise ValueError("no command: the local node cannot run an image's entrypoint")
        argv = [mounts.rewrite(resolve(part)) for part in [*command, *args]]
        argv[0] = _executable(argv[0])
        working_dir = spec.get("workingDir")
        cwd = Path(mounts.rewrite(working_dir)) if working_dir else self.dir
        ports = {p["name"]: p["containerPort"] for p in spec.get("ports") or [] if p.get("name")}
        return Launch(
            argv=argv,
            env=env,
            cwd=cwd if cwd.is_dir() else self.dir,
            ports=ports,
            ip=self.ip,
            message_file=message_file,
            read_only_binds=tuple(binds),
        )

    def _sa_kubeconfig(self, sa_dir: Path) -> Path:
        """In-cluster clients fall back to KUBECONFIG: this is the pod's own identity."""
        namespace = (sa_dir / "namespace").read_text().strip()
        path = self.dir / "kubeconfig"
        sa = self.pod["spec"].get("serviceAccountName", "default")
        _write_kubeconfig(
            path,
            self.client.configuration.host,
            (sa_dir / "ca.crt").read_text(),
            (sa_dir / "token").read_text().strip(),
            f"system:serviceaccount:{namespace}:{sa}",
            namespace,
        )
        return path

    # -- status and targets ------------------------------------------------------------------

    def _publish_status(self) -> None:
        status = self._status()
        if status == self._published:
            return
        body = {"metadata": {"uid": self.uid}, "status": status}  # uid: not a same-name successor
        try:
            self.core.patch_namespaced_pod_status(
                self.pod_name, self.namespace, body, _content_type=MERGE_PATCH
            )
            self._published = status
        except ApiException as err:
            log.debug("status of %s/%s: %s", self.namespace, self.pod_name, err)

    def _status(self) -> dict[str, Any]:
        images = {c["name"]: c.get("image", "") for c in self.pod["spec"]["containers"]}
        statuses = [c.status(images[c.name]) for c in self.containers]
        ready = all(s["ready"] for s in statuses)
        running = any(c.proc is not None for c in self.containers)
        if all(c.done for c in self.containers):
            failed = any((c.last_terminated or {}).get("exitCode") for c in self.containers)
            phase = "Failed" if failed else "Succeeded"
        else:
            phase = (
                "Running"
                if running or any(c.restart_count for c in self.containers)
                else ("Pending")
            )
        conditions = [
            self._condition("PodScheduled", True),
            self._condition("Initialized", True),
            self._condition("ContainersReady", ready, "ContainersNotReady"),
            self._condition("Ready", ready, "ContainersNotReady"),
        ]
        return {
            "phase": phase,
            "hostIP": self._host_ip,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self._start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        }

    def _condition(self, kind: str, value: bool, reason: str = "") -> dict[str, Any]:
        text = "True" if value else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != text:
            self._transitions[kind] = (text, now_rfc3339())
        condition = {
            "type": kind,
            "status": text,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }
        if not value and reason:
            condition["reason"] = reason
        return condition

    def _write_target(self) -> None:
        """Prometheus file_sd target for pods annotated prometheus.io/scrape=true."""
        meta = self.pod["metadata"]
        annotations = meta.get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true":
            return
        ports = [
            p["containerPort"] for c in self.pod["spec"]["containers"] for p in c.get("ports") or []
        ]
        port = annotations.get("prometheus.io/port") or (ports[0] if ports else None)
        if port is None:
            return
        labels = {"namespace": self.namespace, "pod": self.pod_name}
        deployment = (meta.get("labels") or {}).get(DEPLOYMENT_LABEL)
        if deployment:
            labels["moedeployment"] = deployment
        if annotations.get("prometheus.io/path"):
            labels["__metrics_path__"] = annotations["prometheus.io/path"]
        document = [{"targets": [f"{self.ip}:{port}"], "labels": labels}]
        job = scrape_job(self.pod)
        self._target = self.targets_dir / f"{job}-{self.namespace}-{self.pod_name}.json"
        atomic_write(self._target, (json.dumps(document, indent=2) + "\n").encode())


def _previous_restarts(status: dict[str, Any] | None) -> int:
    if status is None or "containerID" not in status:
        return 0
    return int(status.get("restartCount", 0)) + 1


def _executable(command: str) -> str:
    """A container command resolved against the agent's venv first (the image is ignored)."""
    if "/" in command:
        return command
    for directory in [str(BIN_DIR), *SYSTEM_PATH.split(":")]:
        candidate = Path(directory) / command
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"command {command!r} not found in {BIN_DIR} or {SYSTEM_PATH}")
