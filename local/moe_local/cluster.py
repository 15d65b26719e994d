"""The embedded local cluster: control plane + node agent (+ Prometheus), up / status / down.

    cluster = LocalCluster(LocalClusterConfig(workdir=Path("/tmp/moe")))
    cluster.up()            # blocks until the node is Ready (and Prometheus answers)
    ...                     # KUBECONFIG=cluster.kubeconfig
    cluster.down()          # agent first (it kills its pods' processes), Prometheus, the plane

Every process runs in its own session and is recorded, with its kernel start time (so a reused
pid is never signalled), in `<workdir>/state.json`; `down()` works from that file alone, so another
process (`moe-ep local down`) can stop what `moe-ep local up` started. Everything listens on
127.0.0.0/8 only.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, ApiextensionsV1Api, CoreV1Api
from kubernetes.client.rest import ApiException

from moe_local.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
    default_bin_dir,
    ensure_binaries,
    free_port,
)
from moe_local.kube import API_ERRORS, api_client, get_or_none, readyz
from moe_local.prometheus import write_prometheus_config

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
STATE_VERSION = 1
PLANE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
STOP_ORDER = ("nodeagent", "prometheus", *reversed(PLANE_COMPONENTS))


def default_workdir() -> Path:
    base = os.environ.get("MOE_EP_CACHE") or str(Path.home() / ".cache" / "moe-ep")
    return Path(os.environ.get("MOE_EP_LOCAL_DIR") or Path(base) / "local")


@dataclass(frozen=True)
class LocalClusterConfig:
    workdir: Path = field(default_factory=default_workdir)
    bin_dir: Path = field(default_factory=default_bin_dir)
    node_name: str = "moe-local"
    gpus: int = 16
    prometheus: bool = False
    prometheus_port: int | None = None
    """Prometheus web port on 127.0.0.1; a free one when None."""
    scrape_interval: str = "5s"
    """Scrape and rule-evaluation interval of the local Prometheus (the example uses 15s)."""
    alert_for: str | None = None
    """Overrides every alert's `for:` in the local copy of the rules (a demo cannot wait 5m)."""
    timeout_s: float = 60.0


class LocalClusterError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, config: LocalClusterConfig) -> None:
        self.config = config
        self.workdir = config.workdir.resolve()
        self.state_file = self.workdir / "state.json"
        self.kubeconfig = self.workdir / "plane" / "kubeconfig"
        self._plane: ControlPlane | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    # -- up ----------------------------------------------------------------------------------

    def up(self, detach: bool = False) -> dict[str, Any]:
        """Start everything; return the state. `detach`: outlive this Python process."""
        if self.state_file.exists():
            if any(alive(p) for p in read_state(self.state_file)["processes"].values()):
                raise LocalClusterError(f"already up (state in {self.state_file}); run down first")
            self.down()
        for stale in ("plane", "pods", "prometheus", "logs"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        (self.workdir / "logs").mkdir(parents=True)
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "node": self.config.node_name,
            "processes": {},
            "prometheus": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if not detach:
            atexit.register(self.down)
        try:
            plane = self._plane = ControlPlane(
                ControlPlaneConfig(
                    workdir=self.workdir / "plane", bin_dir=ensure_binaries(self.config.bin_dir)
                )
            )
            plane.start(before_controllers=apply_crds)
            state["apiserver"] = plane.server
            for name, pid in plane.pids().items():
                state["processes"][name] = record(pid, plane.log_file(name))
            self._write_state(state)
            state["processes"]["nodeagent"] = self._start_agent()
            self._write_state(state)
            if self.config.prometheus:
                proc_record, prom = self._start_prometheus()
                state["processes"]["prometheus"], state["prometheus"] = proc_record, prom
                self._write_state(state)
            self._wait_node_ready()
        except BaseException:
            self.down()
            raise
        if detach:
            atexit.unregister(plane.stop)  # the plane must outlive `moe-ep local up`
        return state

    def _start_agent(self) -> dict[str, Any]:
        log_path = self.workdir / "logs" / "nodeagent.log"
        argv = [
            sys.executable,
            "-m",
            "moe_local.nodeagent",
            "--kubeconfig",
            str(self.kubeconfig),
            "--node-name",
            self.config.node_name,
            "--gpus",
            str(self.config.gpus),
            "--workdir",
            str(self.workdir),
        ]
        return self._spawn(argv, log_path)

    def _start_prometheus(self) -> tuple[dict[str, Any], dict[str, Any]]:
        binary = shutil.which("prometheus")
        if binary is None:
            raise LocalClusterError("prometheus not installed (Debian package `prometheus`)")
        port = self.config.prometheus_port or free_port()
        prom_dir = self.workdir / "prometheus"
        config_path = write_prometheus_config(
            prom_dir, self.config.scrape_interval, self.config.alert_for
        )
        argv = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ]
        proc_record = self._spawn(argv, self.workdir / "logs" / "prometheus.log")
        url = f"http://127.0.0.1:{port}"
        self._wait(lambda: _http_ok(url + "/-/ready"), "Prometheus /-/ready", proc_record)
        return proc_record, {
            "url": url,
            "config": str(config_path),
            "targets_dir": str(prom_dir / "targets"),
        }

    def _spawn(self, argv: list[str], log_path: Path) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._children.append(proc)
        return record(proc.pid, log_path)

    def _wait_node_ready(self) -> None:
        client = self.client()
        core = CoreV1Api(client)
        agent = read_state(self.state_file)["processes"]["nodeagent"]

        def ready() -> bool:
            found = get_or_none(core.read_node, self.config.node_name)
            node = client.sanitize_for_serialization(found)
            conditions = ((node or {}).get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        self._wait(ready, f"node {self.config.node_name} Ready", agent)

    def _wait(self, ready: Any, what: str, proc_record: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        while time.monotonic() < deadline:
            if not alive(proc_record):
                tail = Path(proc_record["log"]).read_text(errors="replace").splitlines()[-20:]
                raise LocalClusterError(f"{what}: process exited:\n" + "\n".join(tail))
            with contextlib.suppress(*API_ERRORS):
                if ready():
                    return
            time.sleep(0.2)
        raise LocalClusterError(f"timed out waiting for {what}; logs in {self.workdir / 'logs'}")

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def client(self) -> ApiClient:
        """An admin client of this cluster's API server (wrap it: `CoreV1Api(client)`)."""
        return api_client(self.kubeconfig)

    def create_namespace(self, name: str) -> None:
        """Create a namespace and wait for its default ServiceAccount token (1.20 admission
        rejects pods until it exists)."""
        core = CoreV1Api(self.client())
        with contextlib.suppress(ApiException):  # 409: already there
            core.create_namespace({"metadata": {"name": name}})

        def token_ready() -> bool:
            sa = get_or_none(core.read_namespaced_service_account, "default", name)
            return bool(sa and sa.secrets)

        deadline = time.monotonic() + self.config.timeout_s
        while not token_ready():
            if time.monotonic() > deadline:
                raise LocalClusterError(f"no ServiceAccount token in namespace {name}")
            time.sleep(0.1)

    # -- down --------------------------------------------------------------------------------

    def down(self, grace_s: float = 15.0) -> list[str]:
        """Stop everything in order; return what survived (empty: nothing left behind)."""
        atexit.unregister(self.down)
        processes = read_state(self.state_file)["processes"] if self.state_file.exists() else {}
        for name in STOP_ORDER:
            if name in processes:
                stop_process(processes[name], grace_s)
        if self._plane is not None:
            self._plane.stop()  # reaps its Popen objects; the processes are already gone
            self._plane = None
        for proc in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._children.clear()
        pods = pod_process_records(self.workdir)
        for pod_record in pods:  # normally already gone with the agent; a safety net
            stop_process(pod_record, 0)
        left = [f"{name} (pid {r['pid']})" for name, r in processes.items() if alive(r)]
        left += [f"pod process {r['pid']} ({r['log']})" for r in pods if alive(r)]
        if not left:
            self.state_file.unlink(missing_ok=True)
        return left

    # -- status ------------------------------------------------------------------------------

    def status(self) -> list[tuple[str, bool, str]]:
        """(component, healthy, detail) for every component in the state file."""
        if not self.state_file.exists():
            return [("cluster", False, f"not up (no {self.state_file})")]
        state = read_state(self.state_file)
        rows = [
            (name, alive(r), f"pid {r['pid']}, log {r['log']}")
            for name, r in state["processes"].items()
        ]
        client = api_client(Path(state["kubeconfig"]))
        try:
            ok = readyz(client, timeout_s=3)
        except API_ERRORS:
            ok = False
        rows.append(("apiserver /readyz", ok, state["apiserver"]))
        rows.append(self._node_row(CoreV1Api(client), state["node"]))
        if state.get("prometheus"):
            url = state["prometheus"]["url"]
            rows.append(("prometheus /-/ready", _http_ok(url + "/-/ready"), url))
        return rows

    @staticmethod
    def _node_row(core: CoreV1Api, node_name: str) -> tuple[str, bool, str]:
        try:
            found = get_or_none(core.read_node, node_name)
            node = core.api_client.sanitize_for_serialization(found) or {}
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}")
        except API_ERRORS as err:
            return (f"node {node_name}", False, str(err))
        status = node.get("status") or {}
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
        )
        gpus = (status.get("capacity") or {}).get("nvidia.com/gpu", "0")
        return (f"node {node_name}", ready, f"{gpus} GPUs, {len(pods.items)} pods")


# -- processes by record ---------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) process; None when there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def record(pid: int, log_path: Path) -> dict[str, Any]:
    return {"pid": pid, "start_time": _start_time(pid), "log": str(log_path)}


def alive(proc_record: dict[str, Any]) -> bool:
    """The recorded process still runs (same pid *and* start time: not a reused pid)."""
    start = _start_time(proc_record["pid"])
    return start is not None and start == proc_record["start_time"]


def stop_process(proc_record: dict[str, Any], grace_s: float) -> None:
    """SIGTERM the recorded process group, SIGKILL after grace_s; reap it if it is our child."""
    pid = proc_record["pid"]
    if alive(proc_record):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive(proc_record) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if alive(proc_record):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # The leader may be gone and its group not: only signal a group we started.
        if proc_record["start_time"] is not None and _start_time(pid) is None:
            os.killpg(pid, signal.SIGKILL)
    for _ in range(100):  # SIGKILL is asynchronous: wait until it is gone (and reaped, if ours)
        _reap(pid)
        if not alive(proc_record):
            break
        time.sleep(0.02)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def pod_process_records(workdir: Path) -> list[dict[str, Any]]:
    """Pod processes the agent recorded (`logs/<container>.pid`) and that run in the pod's dir."""
    records = []
    for pid_file in workdir.glob("pods/*/logs/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            # The pid file may be stale: only a process whose cwd is the pod's dir is ours.
            if Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(pid_file.parent.parent):
                records.append(record(pid, pid_file.with_suffix(".log")))
    return records


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise LocalClusterError(f"{path}: unknown state version {state.get('version')}")
    return state


# -- CRDs --------------------------------------------------------------------------------------


def apply_crds(kubeconfig: Path) -> None:
    """Create the CRDs from crds/ (or generated from the API models) and wait until Established."""
    client = api_client(kubeconfig)
    extensions = ApiextensionsV1Api(client)
    if CRDS_DIR.is_dir():
        documents = [
            doc
            for path in sorted(CRDS_DIR.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text())
            if doc
        ]
    else:
        from moe_operator.crd import build_crd

        documents = [build_crd()]
    for crd in documents:
        with contextlib.suppress(ApiException):  # 409: already there
            extensions.create_custom_resource_definition(crd)
    for crd in documents:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = get_or_none(extensions.read_custom_resource_definition, crd["metadata"]["name"])
            current = client.sanitize_for_serialization(found) or {}
            conditions = (current.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            time.sleep(0.1)
        else:
            raise LocalClusterError(f"CRD {crd['metadata']['name']} not Established")


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
