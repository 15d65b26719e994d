"""Fixtures: the real operator (kopf, in its own thread) against kmock's Kubernetes emulator.

- `kmock`: kmock's `KubernetesEmulator` plus the few API-server behaviours the operator relies on
  and the emulator leaves out (see `moe_kmock.ApiServer`), on a real local port; tests assert on
  its objects and its request history (`api` wraps it for brevity).
- `operator`: `kopf.operator(...)` with moe-ep's handlers, logged in through a kubeconfig that
  points at kmock; it runs in a thread with its own event loop so that stopping it (a restart)
  touches nothing of the test's loop, where kmock and the workers serve.
- `workers`: one kmock `RawHandler` per rank, each on its own loopback address (127.0.0.{r+1})
  and the same port, because the port is in the spec and the operator scrapes every pod's IP.
  Rank 0 also serves the plan endpoint, following the worker's contract (moe_worker/server.py).

Helpers live in `moe_kmock.py` (a unique module name: `conftest` is ambiguous across test dirs).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes
import pytest
import pytest_asyncio
import yaml
from moe_kmock import (
    CM,
    DEPLOY,
    EVENTS,
    MOED,
    PDB,
    PODS,
    ROLE,
    ROLEBINDING,
    SA,
    SECRET,
    STS,
    SVC,
    Api,
    ApiServer,
    Operator,
    Workers,
    free_port,
)

from moe_contract.plan import round_robin_plan


@pytest_asyncio.fixture(name="kmock")
async def kmock_api_server() -> AsyncIterator[ApiServer]:
    """The Kubernetes API the operator talks to (overrides kmock's own fixture of that name)."""
    async with ApiServer() as server, kmock.Server(server):
        server.faults = []
        server.resources[MOED] = kmock.ResourceInfo(
            kind="MoEDeployment",
            singular="moedeployment",
            namespaced=True,
            shortnames={"moed"},
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
        verbs = {"get", "list", "watch", "create", "patch", "delete", "update"}
        for resource, kind in [
            (STS, "StatefulSet"),
            (SVC, "Service"),
            (CM, "ConfigMap"),
            (SECRET, "Secret"),
            (PODS, "Pod"),
            (PDB, "PodDisruptionBudget"),
            (EVENTS, "Event"),
            (DEPLOY, "Deployment"),
            (SA, "ServiceAccount"),
            (ROLE, "Role"),
            (ROLEBINDING, "RoleBinding"),
        ]:
            server.resources[resource] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=True, verbs=verbs
            )
        # kopf waits for namespaces to be discoverable (its backbone), even when cluster-wide.
        server.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", singular="namespace", namespaced=False, verbs=verbs
        )
        yield server


@pytest.fixture()
def api(kmock: ApiServer) -> Api:
    return Api(kmock)


@pytest.fixture()
def kubeconfig(kmock: ApiServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "operator", "user": {"token": "kmock-token"}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}
                ],
                "current-context": "kmock",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The client reads $KUBECONFIG once, at import; a process would have it set by then.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster config
    return str(path)


@pytest_asyncio.fixture()
async def operator(kubeconfig: str) -> AsyncIterator[Operator]:
    """A started operator; stopped at the end, and it must not have crashed meanwhile."""
    runner = Operator()
    await runner.start()
    yield runner
    if runner.running:
        await runner.stop()
    assert runner.error is None, runner.error


@pytest_asyncio.fixture()
async def workers() -> AsyncIterator[Workers]:
    world = 2
    plan = round_robin_plan(2, 4, world, 2).to_document()
    fake = Workers(world=world, port=free_port(world), plan=plan)
    for rank in range(world):
        handler = kmock.RawHandler()
        await handler.__aenter__()
        handler["get /metrics"] << functools.partial(fake.metrics, rank)
        handler["get /readyz"] << functools.partial(fake.readyz, rank)
        if rank == 0:
            handler["get /v1/plan"] << fake.get_plan
            handler["post /v1/plan"] << fake.post_plan
        handler.fallback << 404
        fake.handlers.append(handler)
        fake.servers.append(None)
        await fake.start(rank)
    yield fake
    for rank in range(world):
        if fake.servers[rank] is not None:
            await fake.stop(rank)
        await fake.handlers[rank].__aexit__(None, None, None)
