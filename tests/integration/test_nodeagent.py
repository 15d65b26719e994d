"""The local node agent runs pods bound to its Node as local processes, like a kubelet would.

One local cluster (control plane + agent, no Prometheus) for the module; the last test stops it.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import AppsV1Api, CoreV1Api
from kubernetes.client.rest import ApiException

from moe_local.cluster import LocalCluster, LocalClusterConfig, alive, stop_process
from moe_local.controlplane import ensure_binaries
from moe_local.kube import MERGE_PATCH, api_client, get_or_none
from moe_local.podspec import pod_ip
from moe_operator.api import MoEDeploymentSpec
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.kube import Cluster
from moe_operator.manifests import children
from tests.integration.kubectl import wait_for as shared_wait_for

pytestmark = pytest.mark.integration

NODE = "moe-local"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Serves /readyz, /env (its environment as JSON) and /file (the file named by $CFG).
SERVER = """
import http.server, json, os, pathlib
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/readyz":
            body = b"ok"
        elif self.path == "/env":
            body = json.dumps(dict(os.environ)).encode()
        else:
            body = pathlib.Path(os.environ["CFG"]).read_bytes()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["MOE_BIND_ADDRESS"], 8080), H).serve_forever()
"""


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    return shared_wait_for(predicate, timeout, what)


def http_get(url: str) -> str:
    with NO_PROXY.open(url, timeout=5) as response:
        return response.read().decode()


def pod_status(core: CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    pod = get_or_none(core.read_namespaced_pod, name, namespace)
    return core.api_client.sanitize_for_serialization(pod.status) if pod and pod.status else {}


def is_ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def container_pid(status: dict[str, Any]) -> int:
    return int(status["containerStatuses"][0]["containerID"].removeprefix("local://"))


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    config = LocalClusterConfig(
        workdir=tmp_path_factory.mktemp("local"), bin_dir=ensure_binaries(), gpus=4
    )
    cluster = LocalCluster(config)
    cluster.up()
    yield cluster
    assert cluster.down() == []


@pytest.fixture(scope="module")
def core(cluster: LocalCluster) -> CoreV1Api:
    return CoreV1Api(cluster.client())


def web_pod(namespace: str) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "ignored:local",
        "command": ["python", "-c"],
        "args": [SERVER],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PEER", "value": f"web-1.web.{namespace}.svc:29500"},
            {"name": "CFG", "value": "/etc/cfg/hello.txt"},
            {
                "name": "GREETING",
                "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "hello.txt"}},
            },
        ],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-0",
            "labels": {"moe-ep.io/deployment": "web"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"},
        },
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
        },
    }


def test_pod_runs_restarts_and_goes(cluster: LocalCluster, core: CoreV1Api) -> None:
    ns = "agent-pod"
    cluster.create_namespace(ns)
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cfg"}, "data": {"hello.txt": "v1"}}
    )
    core.create_namespaced_pod(ns, web_pod(ns))

    status = wait_for("web-0 Ready", lambda: is_ready(s := pod_status(core, ns, "web-0")) and s)
    assert core.read_namespaced_pod("web-0", ns).spec.node_name == NODE
    assert status["phase"] == "Running"
    ip = status["podIP"]
    assert ip == pod_ip(ns, "web-0", str(cluster.workdir)) and ip.startswith("127.")

    env = json.loads(http_get(f"http://{ip}:8080/env"))
    assert env["POD"] == "web-0" and env["IP"] == ip and env["MOE_BIND_ADDRESS"] == ip
    # cluster DNS name -> loopback address
    assert env["PEER"] == f"{pod_ip(ns, 'web-1', str(cluster.workdir))}:29500"
    assert env["GREETING"] == "v1"
    assert env["CFG"].startswith(str(cluster.workdir / "pods")) and env["CFG"].endswith("hello.txt")
    assert http_get(f"http://{ip}:8080/file") == "v1"
    # The ServiceAccount token mount became a kubeconfig with the pod's own identity.
    with pytest.raises(ApiException, match=f"system:serviceaccount:{ns}:default") as denied:
        CoreV1Api(api_client(Path(env["KUBECONFIG"]))).list_namespaced_secret(ns)
    assert denied.value.status == 403
    target = cluster.workdir / "prometheus" / "targets" / f"moe-ep-workers-{ns}-web-0.json"
    document = json.loads(wait_for("file_sd target", target.is_file) and target.read_text())
    assert document == [
        {
            "targets": [f"{ip}:8080"],
            "labels": {"namespace": ns, "pod": "web-0", "moedeployment": "web"},
        }
    ]

    # ConfigMap volumes follow the ConfigMap, as with a kubelet.
    core.patch_namespaced_config_map(
        "cfg", ns, {"data": {"hello.txt": "v2"}}, _content_type=MERGE_PATCH
    )
    wait_for("ConfigMap file refreshed", lambda: http_get(f"http://{ip}:8080/file") == "v2")

    # A process that dies is restarted (restartPolicy Always) and counted.
    first = container_pid(status)
    os.kill(first, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        s = pod_status(core, ns, "web-0")
        restarts = s["containerStatuses"][0]["restartCount"]
        return s if restarts == 1 and is_ready(s) and container_pid(s) != first else None

    status = wait_for("restartCount 1 and Ready", restarted)
    assert status["containerStatuses"][0]["lastState"]["terminated"]["signal"] == signal.SIGKILL

    # Deleting the pod stops its process, then the agent removes the object (grace period 0).
    second = container_pid(status)
    core.delete_namespaced_pod("web-0", ns)
    wait_for(
        "pod object gone",
        lambda: get_or_none(core.read_namespaced_pod, "web-0", ns) is None,
        timeout=15,
    )
    assert process_gone(second)
    assert not target.exists()


def test_moe_worker_pair_becomes_ready(cluster: LocalCluster, core: CoreV1Api) -> None:
    """The operator's own pod template (2 ranks, gloo, tiny shapes) runs and forms its group."""
    ns, name = "agent-workers", "tiny"
    cluster.create_namespace(ns)
    spec = MoEDeploymentSpec.model_validate(
        {
            "model": {
                "layers": 2,
                "expertsPerLayer": 4,
                "hiddenSize": 32,
                "ffnHiddenSize": 64,
                "attentionHeads": 2,
                "headDim": 16,
                "topK": 2,
                "dtype": "float32",
            },
            "parallelism": {"expert": 2},
            "placement": {"slotsPerRank": 2},
            "worker": {
                "gpusPerPod": 1,
                "backend": "gloo",
                "device": "cpu",
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                # A real node's interface: the agent keeps its pods on the loopback regardless.
                "network": {"socketInterface": "eth0"},
                "shm": {"sizeLimit": "1Gi"},
            },
        }
    )
    spec = with_worker_image(spec, WorkerImages.from_environ())  # as the operator fills it in
    shape = children.plan_shape(spec)
    apps = AppsV1Api(core.api_client)
    core.create_namespaced_service(ns, children.build_service(name, spec))
    core.create_namespaced_config_map(
        ns, children.build_plan_configmap(name, {shape.key: shape.round_robin(1)})
    )
    core.create_namespaced_secret(ns, children.build_token_secret(name))
    apps.create_namespaced_stateful_set(ns, children.build_statefulset(name, ns, spec))
    # The operator's thin shell picks the budget's version by discovery (v1beta1 on 1.20).
    kube = Cluster(core.api_client)
    pdb = kube.create(ns, children.build_pdb(name, spec, kube.pdb_api_version()))
    assert pdb["apiVersion"] == "policy/v1beta1" and pdb["spec"]["minAvailable"] == 2
    assert kube.get("PodDisruptionBudget", ns, name)["metadata"]["uid"] == pdb["metadata"]["uid"]

    pods = [f"{name}-0", f"{name}-1"]
    wait_for(
        "both ranks Ready",
        lambda: all(is_ready(pod_status(core, ns, pod)) for pod in pods),
        timeout=60,
    )
    for rank, pod in enumerate(pods):
        status = pod_status(core, ns, pod)
        assert status["containerStatuses"][0]["restartCount"] == 0
        metrics = http_get(f"http://{status['podIP']}:8080/metrics")
        assert f'moe_plan_version{{rank="{rank}"}} 1.0' in metrics
    targets = sorted((cluster.workdir / "prometheus" / "targets").glob(f"*-{ns}-*.json"))
    assert [t.name for t in targets] == [f"moe-ep-workers-{ns}-{pod}.json" for pod in pods]

    pids = [container_pid(pod_status(core, ns, pod)) for pod in pods]
    apps.delete_namespaced_stateful_set(name, ns)
    wait_for("worker pods gone", lambda: not core.list_namespaced_pod(ns).items, timeout=45)
    assert all(process_gone(pid) for pid in pids)


# Reads $DATA/weights.txt, tries to write beside it, reports both in its termination message.
CHECKER = """
import os, pathlib, sys
data = pathlib.Path(os.environ["DATA"])
read = (data / "weights.txt").read_text()
try:
    (data / "new.txt").write_text("x")
    wrote = "written"
except OSError as error:
    wrote = f"refused ({error.strerror})"
pathlib.Path(os.environ["MESSAGE"]).write_text(f"read {read}; write {wrote}")
sys.exit(2)
"""


def one_shot(name: str, container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": "ignored", **container}],
            "volumes": volumes,
        },
    }


def container_state(core: CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    statuses = pod_status(core, ns, name).get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


def test_host_paths_read_only_mounts_and_termination_messages(
    cluster: LocalCluster, core: CoreV1Api, tmp_path: Path
) -> None:
    """A readOnly hostPath mount is the host directory, read-only where the kernel allows mount
    namespaces; what the container writes at its terminationMessagePath (found through an env
    value naming it) comes back in its terminated state, as from a kubelet."""
    from moe_local.podprocess import read_only_binds_available

    ns = "agent-volumes"
    cluster.create_namespace(ns)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.txt").write_text("w1")
    checker = {
        "command": ["python", "-c", CHECKER],
        "env": [
            {"name": "DATA", "value": "/models"},
            {"name": "MESSAGE", "value": "/dev/termination-log"},
        ],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }
    host = {"name": "models", "hostPath": {"path": str(tmp_path / "models"), "type": "Directory"}}
    core.create_namespaced_pod(ns, one_shot("checker", checker, [host]))

    def terminated() -> dict[str, Any] | None:
        return container_state(core, ns, "checker").get("terminated")

    done = wait_for("checker terminated", terminated, timeout=60)
    assert done["exitCode"] == 2
    if read_only_binds_available():
        assert done["message"] == "read w1; write refused (Read-only file system)"
        assert not (tmp_path / "models" / "new.txt").exists()
    else:  # no mount namespaces on this machine: the agent says so in its log
        assert done["message"] == "read w1; write written"
    assert pod_status(core, ns, "checker")["phase"] == "Failed"

    # Nothing written to the file, FallbackToLogsOnError: the end of the log stands in.
    crash = {
        "command": ["python", "-c", "print('first'); raise SystemExit('boom: no weights')"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    core.create_namespaced_pod(ns, one_shot("crasher", crash, []))
    done = wait_for(
        "crasher terminated",
        lambda: container_state(core, ns, "crasher").get("terminated"),
        timeout=60,
    )
    assert done["exitCode"] == 1 and done["message"] == "first\nboom: no weights"


def test_volumes_the_agent_cannot_provide_hold_the_pod_saying_why(
    cluster: LocalCluster, core: CoreV1Api, tmp_path: Path
) -> None:
    ns = "agent-refused"
    cluster.create_namespace(ns)
    sleeper = {"command": ["sleep", "60"]}
    nfs = {"name": "data", "nfs": {"server": "nas.example", "path": "/export"}}
    missing = {"name": "data", "hostPath": {"path": str(tmp_path / "absent"), "type": "Directory"}}
    core.create_namespaced_pod(ns, one_shot("on-nfs", sleeper, [nfs]))
    core.create_namespaced_pod(ns, one_shot("on-nothing", sleeper, [missing]))

    def waiting(name: str) -> dict[str, Any] | None:
        state = container_state(core, ns, name).get("waiting") or {}
        return state if state.get("message") else None

    refused = wait_for("on-nfs waiting with a message", lambda: waiting("on-nfs"))
    assert refused["reason"] == "VolumeNotSupported"
    assert "'data'" in refused["message"] and "nfs volumes cannot be emulated" in refused["message"]
    absent = wait_for("on-nothing waiting with a message", lambda: waiting("on-nothing"))
    assert absent["reason"] == "ContainerCreating" and "is not a directory" in absent["message"]
    for name in ("on-nfs", "on-nothing"):
        assert pod_status(core, ns, name)["phase"] == "Pending"
        core.delete_namespaced_pod(name, ns)


def test_down_leaves_nothing_behind(cluster: LocalCluster, core: CoreV1Api) -> None:
    ns = "agent-down"
    cluster.create_namespace(ns)
    pod = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": "ignored", "command": ["sleep", "600"]}],
        },
    }
    core.create_namespaced_pod(ns, pod)
    status = wait_for("sleeper Ready", lambda: is_ready(s := pod_status(core, ns, "sleeper")) and s)
    pod_pid = container_pid(status)
    state = json.loads(cluster.state_file.read_text())
    assert set(state["processes"]) == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "nodeagent",
    }

    # The agent alone (SIGTERM) kills its pods' processes; down() only checks afterwards.
    stop_process(state["processes"]["nodeagent"], grace_s=15)
    assert process_gone(pod_pid)
    assert cluster.down() == []
    assert not any(alive(record) for record in state["processes"].values())
    assert not cluster.state_file.exists()
