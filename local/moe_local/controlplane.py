"""A real Kubernetes v1.20.2 control plane (etcd, apiserver, controller-manager, scheduler).

Runs on 127.0.0.1 only, for integration tests and the local demo; there is no kubelet (see the local
node agent). It reads the API with the official client on its own admin kubeconfig (never the
process-wide default configuration); its /readyz probe is plain urllib, since the apiserver refuses
connections while it starts and the client would log each of its retries.
Facts behind the flags are in DESIGN.md, "Facts about the local control plane".

    with ControlPlane(ControlPlaneConfig(workdir=tmp, bin_dir=ensure_binaries())) as plane:
        plane.start(before_controllers=apply_crds)   # CRDs before the garbage collector starts
        subprocess.run(["kubectl", "--kubeconfig", str(plane.kubeconfig), "get", "nodes"])
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes.client import CoreV1Api

from moe_local.kube import API_ERRORS, api_client, get_or_none

K8S_VERSION = "v1.20.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
BUILD_SCRIPT = Path(__file__).with_name("build-kubernetes.sh")


def default_bin_dir() -> Path:
    cache = os.environ.get("MOE_EP_CACHE") or str(Path.home() / ".cache" / "moe-ep")
    return Path(cache) / f"k8s-{K8S_VERSION}" / "bin"


def ensure_binaries(bin_dir: Path | None = None) -> Path:
    """Return the directory holding all control-plane binaries, building them if needed.

    The build (apt + Go: 5 to 15 minutes cold on 2 cores) runs only when a binary is missing.
    """
    bin_dir = bin_dir or default_bin_dir()
    if all(os.access(bin_dir / name, os.X_OK) for name in BINARIES):
        return bin_dir
    env = dict(os.environ, MOE_EP_CACHE=str(bin_dir.parent.parent))
    subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, check=True)
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:  # e.g. a bin_dir not laid out as <cache>/k8s-<version>/bin
        raise ControlPlaneError(f"{BUILD_SCRIPT.name} did not provide {missing} in {bin_dir}")
    return bin_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ControlPlaneConfig:
    workdir: Path
    """Holds certificates, kubeconfigs, etcd data and one log file per component."""
    bin_dir: Path = field(default_factory=default_bin_dir)
    """Directory with etcd, kube-apiserver, kube-controller-manager and kube-scheduler."""
    apiserver_port: int | None = None
    """Secure port of the apiserver; a free one when None."""
    service_cluster_ip_range: str = "10.96.0.0/16"
    start_timeout_s: float = 60.0
    """Per waiting step: apiserver ready, default ServiceAccount token present."""
    stop_timeout_s: float = 10.0
    """Grace after SIGTERM before SIGKILL, per component."""


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """Processes of one local control plane; start() then stop(), or use it as a context manager."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self.workdir = config.workdir.resolve()
        self.port = config.apiserver_port or free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        """Admin kubeconfig (group system:masters)."""
        self.ca_file = self.workdir / "pki" / "ca.crt"
        """The cluster's CA, which clients trust; it signs the API server's certificate."""
        self._sa_key = self.workdir / "pki" / "sa.key"
        self._tokens = {
            "admin": secrets.token_hex(16),
            "kube-controller-manager": secrets.token_hex(16),
            "kube-scheduler": secrets.token_hex(16),
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, before_controllers: Callable[[Path], None] | None = None) -> None:
        """Start everything and wait until pods can be created.

        `before_controllers(admin_kubeconfig)` runs between the apiserver and the controllers:
        the place to apply CRDs, since the garbage collector only rescans for new ones every 30 s.
        """
        try:
            self.start_apiserver()
            if before_controllers is not None:
                before_controllers(self.kubeconfig)
            self.start_controllers()
            self.wait_ready()
        except BaseException:
            # A half-started plane is useless; never leave its processes behind.
            self.stop()
            raise

    def start_apiserver(self) -> None:
        """Start etcd and kube-apiserver; return once /readyz answers ok."""
        atexit.register(self.stop)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        self._write_kubeconfigs()
        self._start_etcd()
        self._start_apiserver()
        self._wait(self._apiserver_ready, "kube-apiserver /readyz")

    def start_controllers(self) -> None:
        """Start kube-controller-manager and kube-scheduler (no waiting; see wait_ready)."""
        common = ["--leader-elect=false", "--port=0", "--secure-port=0", "--v=1"]
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self._component_kubeconfig('kube-controller-manager')}",
                # No kubelet here: node lifecycle would taint hand-made nodes NotReady.
                "--controllers=*,-nodelifecycle",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self._sa_key}",
                f"--root-ca-file={self.ca_file}",
                *common,
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={self._component_kubeconfig('kube-scheduler')}",
                *common,
            ],
        )

    def wait_ready(self) -> None:
        """Wait until the default ServiceAccount in `default` has its token secret."""
        self.wait_for_service_account_token("default", "default")

    def stop(self) -> None:
        """Stop all components, newest first (apiserver before etcd); leaves no process behind."""
        atexit.unregister(self.stop)
        for name in reversed(list(self._procs)):
            self._terminate(self._procs.pop(name))

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """Process (and process group) id of each running component."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def log_file(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    # -- API helpers -------------------------------------------------------------------------

    def core(self) -> CoreV1Api:
        """The core API as admin (once start_apiserver has written the admin kubeconfig)."""
        return CoreV1Api(api_client(self.kubeconfig))

    def wait_for_service_account_token(self, namespace: str, name: str = "default") -> str:
        """Return the name of the SA's token secret once the token controller has filled it.

        Pods using the SA are rejected by admission until then (Kubernetes 1.20 behaviour).
        """
        core = self.core()
        found: list[str] = []

        def token_ready() -> bool:
            sa = get_or_none(core.read_namespaced_service_account, name, namespace)
            for ref in (sa.secrets if sa else None) or []:
                secret = get_or_none(core.read_namespaced_secret, ref.name, namespace)
                if secret and (secret.data or {}).get("token"):
                    found.append(ref.name)
                    return True
            return False

        self._wait(token_ready, f"token of ServiceAccount {namespace}/{name}")
        return found[0]

    def make_service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """Write a kubeconfig that authenticates with the ServiceAccount's token; return its path.

        Lets the operator run with exactly the RBAC its chart grants, not as admin.
        """
        secret_name = self.wait_for_service_account_token(namespace, name)
        secret = self.core().read_namespaced_secret(secret_name, namespace)
        token = base64.b64decode(secret.data["token"]).decode()
        path = self.workdir / f"kubeconfig-sa-{namespace}-{name}"
        self._write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}", token, namespace)
        return path

    # -- internals ---------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self.ca_file.parent
        pki.mkdir(parents=True, exist_ok=True)
        # A CA and a serving certificate it signs, as kubeadm makes them: clients built on
        # rustls/webpki (smg's Kubernetes client) refuse a self-signed CA as the server's own.
        self._openssl(
            *["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"],
            *["-subj", "/CN=moe-local-ca", "-addext", "basicConstraints=critical,CA:TRUE"],
            *["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            *["-keyout", str(pki / "ca.key"), "-out", str(self.ca_file)],
        )
        # 10.96.0.1 is the `kubernetes` Service IP, which in-cluster clients would dial.
        extensions = pki / "apiserver.ext"
        extensions.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes.default.svc\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        self._openssl(
            *["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver"],
            *["-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.csr")],
        )
        self._openssl(
            *["x509", "-req", "-in", str(pki / "apiserver.csr"), "-days", "3650"],
            *["-CA", str(self.ca_file), "-CAkey", str(pki / "ca.key"), "-CAcreateserial"],
            *["-extfile", str(extensions), "-out", str(pki / "apiserver.crt")],
        )
        self._openssl("genrsa", "-out", str(self._sa_key), "2048")
        self._openssl("rsa", "-in", str(self._sa_key), "-pubout", "-out", str(pki / "sa.pub"))
        users = {
            "admin": ("admin", "system:masters"),
            "kube-controller-manager": ("system:kube-controller-manager", ""),
            "kube-scheduler": ("system:kube-scheduler", ""),
        }
        # token,user,uid[,"groups"]
        lines = [
            ",".join([self._tokens[key], user, key] + ([f'"{group}"'] if group else []))
            for key, (user, group) in users.items()
        ]
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")

    def _write_kubeconfigs(self) -> None:
        self._write_kubeconfig(self.kubeconfig, "admin", self._tokens["admin"])
        for component in ("kube-controller-manager", "kube-scheduler"):
            self._write_kubeconfig(
                self._component_kubeconfig(component), component, self._tokens[component]
            )

    def _component_kubeconfig(self, component: str) -> Path:
        return self.workdir / f"kubeconfig-{component}"

    def _write_kubeconfig(
        self, path: Path, user: str, token: str, namespace: str = "default"
    ) -> None:
        # JSON is valid YAML: kubectl, kopf and the Python client all read it.
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "moe-ep-local",
                    "cluster": {"server": self.server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "moe-ep-local",
                    "context": {"cluster": "moe-ep-local", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "moe-ep-local",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self._etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._spawn(
            "etcd",
            [
                "--name=moe-ep",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self._etcd_url}",
                f"--advertise-client-urls={self._etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=moe-ep={peer_url}",
            ],
        )

    def _start_apiserver(self) -> None:
        pki = self.ca_file.parent
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                "--advertise-address=127.0.0.1",
                # Endpoints may not hold loopback IPs: no reconciler for the `kubernetes` Service.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={self.config.service_cluster_ip_range}",
                # Hand-made nodes have no kubelet to clear the not-ready taint this plugin adds.
                "--disable-admission-plugins=TaintNodesByCondition",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-signing-key-file={self._sa_key}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                "--v=1",
            ],
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log_path = self.log_file(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # Own session/process group: stop() can signal the whole group, and a Ctrl-C aimed at
            # the test runner does not kill etcd before the apiserver.
            self._procs[name] = subprocess.Popen(
                [str(self.config.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
        # The leader has exited; anything it forked into its group goes too.
        self._signal_group(proc, signal.SIGKILL)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _apiserver_ready(self) -> bool:
        request = urllib.request.Request(
            self.server + "/readyz", headers={"Authorization": f"Bearer {self._tokens['admin']}"}
        )
        try:
            with urllib.request.urlopen(request, context=self._ssl(), timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(*API_ERRORS):  # not up yet (urllib's errors are OSErrors)
                if ready():
                    return
            time.sleep(0.25)
        raise ControlPlaneError(f"timed out waiting for {what}; logs in {self.workdir / 'logs'}")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                tail = self.log_file(name).read_text(errors="replace").splitlines()[-20:]
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}:\n" + "\n".join(tail)
                )

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    @staticmethod
    def _openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
