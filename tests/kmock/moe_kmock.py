"""Harness of the kmock tests: the API server, the operator runner and the fake workers.

Imported by `conftest.py` (the fixtures) and by the tests (constants and helpers).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.test_utils
import jsonpatch
import kmock

os.environ["MOE_OPERATOR_TIMER_SECONDS"] = "0.25"  # read at import: must come first

import kopf
import kubernetes
from prometheus_client import REGISTRY

from moe_contract.plan import Plan, PlanError, parse_plan
from moe_operator import handlers  # registers the handlers with kopf
from moe_operator.api import MoEDeploymentStatus

assert handlers.TIMER_SECONDS == 0.25, "moe_operator.handlers was imported before this conftest"
# The client imports its API classes lazily (~2 s, once): pay that here, not in a test's timing.
_ = (kubernetes.client.CoreV1Api, kubernetes.client.AppsV1Api)

MOED = "moe-ep.io/v1alpha1/moedeployments"
STS = "apps/v1/statefulsets"
SVC = "v1/services"
CM = "v1/configmaps"
SECRET = "v1/secrets"
PODS = "v1/pods"
PDB = "policy/v1/poddisruptionbudgets"
EVENTS = "v1/events"
DEPLOY = "apps/v1/deployments"
SA = "v1/serviceaccounts"
ROLE = "rbac.authorization.k8s.io/v1/roles"
ROLEBINDING = "rbac.authorization.k8s.io/v1/rolebindings"
NS = "ns1"


def small_spec(port: int = 8080, **overrides: Any) -> dict[str, Any]:
    """A valid CPU spec: 2 layers x 4 experts on 2 ranks, 2 slots each; act after one window."""
    spec: dict[str, Any] = {
        "model": {
            "layers": 2,
            "expertsPerLayer": 4,
            "hiddenSize": 8,
            "ffnHiddenSize": 16,
            "attentionHeads": 2,
            "headDim": 4,
            "topK": 1,
            "dtype": "float32",
        },
        "parallelism": {"expert": 2},
        "placement": {"slotsPerRank": 2},
        "worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0, "port": port},
        "rebalancing": {
            "evaluationWindowSeconds": 1,
            "consecutiveEvaluations": 1,
            "cooldownSeconds": 0,
        },
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


# --- the Kubernetes API -------------------------------------------------------------------------


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (to predict whether a patch changes .spec)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


@dataclass
class Fault:
    """Answer `status` to requests matching method, resource and name (and subresource)."""

    method: str
    resource: str
    name: str
    status: int
    subresource: str | None = None
    times: int = 1_000_000

    def matches(self, request: kmock.Request) -> bool:
        return (
            self.times > 0
            and request.method.value.upper() == self.method.upper()
            and request.resource == kmock.resource(self.resource)
            and request.name == self.name
            and request.subresource == self.subresource
        )


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata an API server manages and the operator depends on:
    uids, resourceVersions (and their preconditions on patches), generations, Secrets'
    stringData, uid preconditions on deletes."""

    _versions = itertools.count(1)

    faults: list[Fault]  # set by the fixture: failures to inject, e.g. a status patch refused

    async def _handle(self, request: kmock.Request) -> Any:
        for fault in getattr(self, "faults", []):
            if fault.matches(request):
                fault.times -= 1
                raise kmock.KubernetesError(
                    status=fault.status, reason="Injected", message="injected failure"
                )
        if request.resource is not None and request.subresource is None:
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._on_create(request)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._on_update(request)
            elif request.action == kmock.action.DELETE and request.name is not None:
                self._on_delete(request)
        elif (
            request.resource is not None
            and request.action == kmock.action.UPDATE
            and isinstance(request.data, dict)
        ):  # the status subresource: a new resourceVersion, never a new generation
            request.data.setdefault("metadata", {})["resourceVersion"] = self._next()
        return await super()._handle(request)

    def _next(self) -> str:
        return str(next(self._versions))

    def _on_create(self, request: kmock.Request) -> None:
        body = request.data
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = self._next()
        meta["generation"] = 1
        if "stringData" in body:  # Secrets: the API server stores stringData base64 in data
            data = body.setdefault("data", {})
            for key, value in body.pop("stringData").items():
                data[key] = base64.b64encode(value.encode()).decode()

    def _stored(self, request: kmock.Request) -> Any:
        stored = self.objects._objects.get((request.resource, request.namespace, request.name))
        return None if stored is None or stored.deleted else stored

    def _on_delete(self, request: kmock.Request) -> None:
        stored = self._stored(request)
        wanted = ((request.data or {}) if isinstance(request.data, dict) else {}).get(
            "preconditions"
        ) or {}
        if stored is not None and wanted.get("uid") not in (None, stored.raw["metadata"]["uid"]):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="uid differs")

    def _on_update(self, request: kmock.Request) -> None:
        stored = self._stored(request)
        if stored is None:
            return  # the emulator answers 404
        current = copy.deepcopy(stored.raw)
        meta = current.get("metadata", {})
        if isinstance(request.data, list):  # JSON patch, with kopf's `test` of resourceVersion
            try:
                patched = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=str(error)
                ) from None
            request.data.append(
                {"op": "add", "path": "/metadata/resourceVersion", "value": self._next()}
            )
            if patched.get("spec") != current.get("spec"):
                request.data.append(
                    {"op": "add", "path": "/metadata/generation", "value": meta["generation"] + 1}
                )
        elif isinstance(request.data, dict):
            patch_meta = request.data.setdefault("metadata", {}) or {}
            request.data["metadata"] = patch_meta
            wanted = patch_meta.get("resourceVersion")
            if wanted is not None and wanted != meta.get("resourceVersion"):  # a precondition
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", message="the object has been modified"
                )
            patch_meta["resourceVersion"] = self._next()
            spec = current.get("spec")
            if "spec" in request.data and _merge(spec, request.data["spec"]) != spec:
                patch_meta["generation"] = meta.get("generation", 1) + 1


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """The test's own calls to the API server, over HTTP like any client."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    @staticmethod
    def _url(resource: str, namespace: str, name: str | None = None, sub: str = "") -> str:
        parts = resource.split("/")
        base = "/api/v1" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
        url = f"{base}/namespaces/{namespace}/{parts[-1]}"
        return url + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, resource: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.server.post(self._url(resource, namespace), json=body) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def patch(
        self, resource: str, namespace: str, name: str, body: dict[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        url = self._url(resource, namespace, name, sub)
        async with self.server.patch(url, data=json.dumps(body), headers=headers) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        async with self.server.delete(self._url(resource, namespace, name)) as response:
            assert response.status < 300, await response.text()

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        stored = self.server.objects._objects.get((kmock.resource(resource), namespace, name))
        return None if stored is None or stored.deleted else copy.deepcopy(stored.raw)

    def history(self, resource: str, namespace: str, name: str) -> list[dict[str, Any]]:
        stored = self.server.objects._objects.get((kmock.resource(resource), namespace, name))
        versions = stored.history if stored is not None else []
        return [copy.deepcopy(dict(version)) for version in versions if version is not None]

    def requests(self, method: str, resource: str, namespace: str, name: str) -> list[Any]:
        """The API requests that addressed one object (or, name='', its collection)."""
        return [
            request
            for request in self.server
            if request.method.value.upper() == method.upper()
            and request.resource == kmock.resource(resource)
            and request.namespace == namespace
            and (request.name or "") == name
        ]

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Events about one object, oldest first."""
        return [
            dict(obj.raw)
            for (resource, ns, _), obj in self.server.objects.items()
            if resource == kmock.resource(EVENTS) and ns == namespace and not obj.deleted
            if obj.raw.get("involvedObject", {}).get("name") == name
        ]

    # -- MoEDeployments --

    async def create_moed(
        self, name: str, spec: dict[str, Any], namespace: str = NS
    ) -> dict[str, Any]:
        body = {
            "apiVersion": "moe-ep.io/v1alpha1",
            "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        return await self.create(MOED, namespace, body)

    def moed(self, name: str, namespace: str = NS) -> dict[str, Any]:
        obj = self.get(MOED, namespace, name)
        assert obj is not None, f"MoEDeployment {namespace}/{name} is gone"
        return obj

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        """The object's status, which must be one the API's model (the CRD's source) accepts."""
        status = self.moed(name, namespace).get("status") or {}
        MoEDeploymentStatus.model_validate(status)
        return status

    def condition(self, name: str, kind: str, namespace: str = NS) -> dict[str, Any]:
        for item in self.status(name, namespace).get("conditions") or []:
            if item["type"] == kind:
                return item
        return {}

    def plan_key(self, name: str, namespace: str = NS) -> str | None:
        """The ConfigMap key the StatefulSet's pods map onto plan.json (the spec's shape)."""
        statefulset = self.get(STS, namespace, name)
        if statefulset is None:
            return None
        volumes = statefulset["spec"]["template"]["spec"]["volumes"]
        return next(v for v in volumes if v["name"] == "plan")["configMap"]["items"][0]["key"]

    def plan(self, name: str, namespace: str = NS) -> dict[str, Any] | None:
        configmap, key = self.get(CM, namespace, f"{name}-plan"), self.plan_key(name, namespace)
        raw = ((configmap or {}).get("data") or {}).get(key or "")
        return json.loads(raw) if raw else None

    def token(self, name: str, namespace: str = NS) -> str | None:
        secret = self.get(SECRET, namespace, f"{name}-control")
        return base64.b64decode(secret["data"]["token"]).decode() if secret else None

    # -- what the kubelet and the StatefulSet controller would do --

    def revision(self, name: str, namespace: str = NS) -> str:
        """What the StatefulSet controller names the current template: <name>-<hash>."""
        statefulset = self.get(STS, namespace, name)
        assert statefulset is not None
        template = json.dumps(statefulset["spec"]["template"], sort_keys=True)
        return f"{name}-{hashlib.sha256(template.encode()).hexdigest()[:10]}"

    def pods(self, name: str, namespace: str = NS) -> dict[str, dict[str, Any]]:
        """The deployment's live pods by name."""
        return {
            obj.raw["metadata"]["name"]: copy.deepcopy(obj.raw)
            for (resource, ns, _), obj in self.server.objects.items()
            if resource == kmock.resource(PODS) and ns == namespace and not obj.deleted
            if obj.raw["metadata"]["labels"].get("moe-ep.io/deployment") == name
        }

    async def run_pods(
        self, name: str, world: int, namespace: str = NS, *, ready: int | None = None
    ) -> None:
        """What the StatefulSet controller and the kubelets would do: pods of every missing rank
        on the current template (owned by the StatefulSet, labelled with its revision) at
        127.0.0.{rank+1}, and the StatefulSet's status reporting them all ready (or `ready`)."""
        statefulset = self.get(STS, namespace, name)
        assert statefulset is not None
        revision, existing = self.revision(name, namespace), self.pods(name, namespace)
        for rank in range(world):
            if f"{name}-{rank}" in existing:
                continue
            template = statefulset["spec"]["template"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-{rank}",
                    "labels": {
                        **template["metadata"]["labels"],
                        "controller-revision-hash": revision,
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "StatefulSet",
                            "name": name,
                            "uid": statefulset["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": copy.deepcopy(template["spec"]),
                "status": {"phase": "Running", "podIP": f"127.0.0.{rank + 1}"},
            }
            await self.create(PODS, namespace, pod)
        await self.set_ready(name, world if ready is None else ready, namespace)

    async def set_ready(self, name: str, ready: int, namespace: str = NS) -> None:
        """The StatefulSet controller's status: it has seen the current template (OnDelete: pods
        keep their revision until deleted)."""
        statefulset = self.get(STS, namespace, name)
        assert statefulset is not None
        revision = self.revision(name, namespace)
        revisions = [
            pod["metadata"]["labels"].get("controller-revision-hash")
            for pod in self.pods(name, namespace).values()
        ]
        status = {
            "replicas": statefulset["spec"]["replicas"],
            "readyReplicas": ready,
            "updatedReplicas": revisions.count(revision),
            "observedGeneration": statefulset["metadata"]["generation"],
            "updateRevision": revision,
            "currentRevision": revision if set(revisions) <= {revision} else revisions[0],
        }
        await self.patch(STS, namespace, name, {"status": status}, sub="status")


def timer_runs() -> float:
    """How many timer runs of the operator finished (its own histogram's count)."""
    return (
        REGISTRY.get_sample_value("moe_operator_reconcile_seconds_count", {"handler": "refresh"})
        or 0.0
    )


async def timer_ran(times: int = 3, timeout: float = 10.0) -> None:
    """Wait until the operator's timer has run `times` more times (for every object: the count
    is global, so wait for more runs than objects when several exist)."""
    start = timer_runs()
    await eventually(lambda: timer_runs() >= start + times, timeout, f"{times} timer runs")


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


# --- the operator -------------------------------------------------------------------------------


class Operator:
    """The operator as a process would run it (`moe_operator.main`), in a thread instead."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._settings = kopf.OperatorSettings()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        assert not self.running
        self._stop, self._ready, self.error = threading.Event(), threading.Event(), None
        self._settings = kopf.OperatorSettings()  # the operator's startup handler tunes it
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._thread.start()
        self.starts += 1
        await eventually(
            lambda: self._ready.is_set() or self.error, timeout=30, what="operator start"
        )
        assert self.error is None, self.error

    def _main(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    settings=self._settings,
                    standalone=True,
                    clusterwide=True,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as error:  # a crash is what the tests look for
            self.error = error

    async def stop(self) -> None:
        """A restart's first half; the handlers in flight finish, kopf lets go of its watches."""
        assert self._thread is not None
        # Like SIGTERM within a pod's grace period: a timer run in flight finishes (and patches
        # its status) instead of being orphaned mid-way and cut off after kopf's 5 s.
        self._settings.background.instant_exit_timeout = 2.0
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive(), "operator did not stop within 30s"
        assert self.error is None, self.error


# --- the workers --------------------------------------------------------------------------------


@dataclass
class Workers:
    """The ranks' HTTP endpoints: token counters, and rank 0's plan endpoint.

    Experts 0 and 2 of every layer are hot (100 tokens per scrape, the others 10). The round-robin
    plan puts both on rank 0 (slots [[0, 2], [1, 3]]): rank loads 200 vs 20, imbalance 1.82; a
    plan with one hot expert per rank balances them, and so (in this model) does any gate bias,
    which steers tokens away from the hot experts: every expert then gets 55. Each rank exports
    counters for the experts in its slots of the plan it serves (and keeps series it once had,
    as prometheus_client does); they grow on every scrape, as a worker's would between scrapes
    (exact, whatever the machine's load: growth with time made a window's ranks differ by the
    gap between their reads). A drain reads the leader's GET /readyz (`readyz`: nothing in
    flight), never /metrics, so only the loads' reads count.
    """

    world: int
    port: int
    plan: dict[str, Any]  # what the leader serves (GET /v1/plan)
    token: str | None = None  # the bearer token POST /v1/plan requires; None: not checked yet
    post_status: int | None = None  # force this HTTP status on POST /v1/plan (e.g. 500)
    metrics_override: bytes | None = None  # serve this instead of the counters (garbage tests)
    restarting: int | None = None  # this rank's counters go down between scrapes (restarts)
    durable: Callable[[], int | None] = lambda: None  # the ConfigMap's plan version, at POST time
    counters: dict[int, dict[tuple[int, int], float]] = field(default_factory=dict)
    posts: list[dict[str, Any]] = field(default_factory=list)  # every POST /v1/plan seen
    applied: list[int] = field(default_factory=list)  # versions switched to, in order
    handlers: list[kmock.RawHandler] = field(default_factory=list)
    servers: list[aiohttp.test_utils.RawTestServer | None] = field(default_factory=list)

    @property
    def version(self) -> int:
        return int(self.plan["version"])

    def _experts(self, rank: int) -> dict[int, list[int]]:
        return {
            layer: list(self.plan["slots"][layer][rank]) for layer in range(len(self.plan["slots"]))
        }

    def _grow(self, rank: int) -> None:
        counters = self.counters.setdefault(rank, {})
        for layer, experts in self._experts(rank).items():
            for expert in experts:
                grow = 100.0 if expert in (0, 2) else 10.0
                if self.plan.get("gateBias"):
                    grow = 55.0
                counters[layer, expert] = counters.get((layer, expert), 0.0) + grow

    def metrics(self, rank: int) -> bytes:
        if self.metrics_override is not None:
            return self.metrics_override
        if rank == self.restarting and self.counters.get(rank):
            # A worker restarted since the last scrape: its counters start again from ~0.
            self.counters[rank] = {key: value / 2 for key, value in self.counters[rank].items()}
        else:
            self._grow(rank)
        lines = ["# TYPE moe_expert_tokens_total counter"]
        for (layer, expert), value in sorted(self.counters[rank].items()):
            lines.append(f'moe_expert_tokens_total{{layer="{layer}",expert="{expert}"}} {value}')
        lines += ["# TYPE moe_plan_version gauge", f"moe_plan_version {self.version}", ""]
        return "\n".join(lines).encode()

    def readyz(self, rank: int) -> Any:
        """A ready rank with nothing in flight (a drain's read: the worker's drain contract)."""
        return {"ready": True, "rank": rank, "draining": False, "inFlight": 0}

    def get_plan(self, request: kmock.Request) -> Any:
        if self.token is None or request.headers.get("Authorization") != f"Bearer {self.token}":
            return kmock.Response(status=401, payload={"error": "missing or wrong bearer token"})
        return {**self.plan, "digest": Plan.model_validate(self.plan).digest()}

    def post_plan(self, request: kmock.Request) -> Any:
        self.posts.append(
            {
                "authorization": request.headers.get("Authorization"),
                "body": request.data,
                "configmap_version": self.durable(),
            }
        )
        if self.token is None or request.headers.get("Authorization") != f"Bearer {self.token}":
            return kmock.Response(status=401, payload={"error": "missing or wrong bearer token"})
        if self.post_status is not None:
            return kmock.Response(status=self.post_status, payload={"error": "injected failure"})
        try:
            plan = parse_plan(request.data)
        except PlanError as error:
            return kmock.Response(status=400, payload={"error": str(error)})
        if plan.version <= self.version:
            payload = {"applied": False, "reason": "stale", "version": self.version}
            return kmock.Response(status=409, payload=payload)
        self.plan = plan.to_document()
        self.applied.append(plan.version)
        return {
            "applied": True,
            "version": plan.version,
            "digest": plan.digest(),
            "pauseSeconds": 0.01,
        }

    async def start(self, rank: int) -> None:
        # A bare aiohttp server for kmock's handler: kmock.Server would also hook aiohttp's DNS
        # resolution, a stack that must unwind in order; nothing here resolves names.
        server = aiohttp.test_utils.RawTestServer(
            self.handlers[rank], host=f"127.0.0.{rank + 1}", port=self.port
        )
        await server.start_server()
        self.servers[rank] = server

    async def stop(self, rank: int) -> None:
        """Connection refused from now on, until `start(rank)`."""
        server = self.servers[rank]
        assert server is not None
        self.servers[rank] = None
        await server.close()


def free_port(world: int) -> int:
    import socket

    for _ in range(50):
        sockets = []
        try:
            first = socket.socket()
            sockets.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            for rank in range(1, world):
                other = socket.socket()
                sockets.append(other)
                other.bind((f"127.0.0.{rank + 1}", port))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no port free on every loopback address")
