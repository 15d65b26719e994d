"""Pods of several ranks: `moe-worker serve` in a pod with MOE_RANKS_PER_POD starts the pod's
ranks (rank = ordinal x ranks per pod + local rank) and answers for all of them on the pod's one
control port. Two "pods" of two ranks each (world 4, gloo), each on its own loopback address as
the local node agent gives them, checked the way kubelets, Prometheus and the operator see them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_contract import env
from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.launcher import LocalRanks, pod_rank_settings
from moe_worker.settings import WorkerSettings, settings_from_env
from tests.worker.worker_harness import free_port

pytestmark = pytest.mark.distributed

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, vocab_size=80
)
PODS, PER_POD = 2, 2
WORLD = PODS * PER_POD
TOKEN = "pod-test-token"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    outgoing = urllib.request.Request(url, data=data)
    if token:
        outgoing.add_header("Authorization", f"Bearer {token}")
    try:
        with NO_PROXY.open(outgoing, timeout=30) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


@dataclass
class Pods:
    procs: list[subprocess.Popen[bytes]]
    hosts: list[str]
    port: int
    api_port: int
    logs: list[Path]

    def url(self, pod: int, path: str) -> str:
        return f"http://{self.hosts[pod]}:{self.port}{path}"

    def rank_url(self, rank: int, path: str) -> str:
        pod, local = divmod(rank, PER_POD)
        return f"http://{self.hosts[pod]}:{env.internal_control_port(self.port, local)}{path}"

    def log(self, pod: int) -> str:
        return self.logs[pod].read_text(errors="replace")

    def wait(self, what: str, predicate: Any, timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = predicate()
            except OSError:
                found = None
            if found:
                return found
            assert time.monotonic() < deadline, f"{what}:\n" + "\n".join(map(self.log, (0, 1)))
            time.sleep(0.3)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Pods]:
    (tmp_path / "token").write_text(TOKEN)
    hosts = [f"127.0.{40 + pod}.{pod + 1}" for pod in range(PODS)]
    port, api_port, master_port = free_port(), free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    procs, logs = [], []
    for pod, host in enumerate(hosts):
        variables = {
            **base,
            **env.shape_to_env(SHAPE),
            "OMP_NUM_THREADS": "1",
            env.POD_NAME: f"demo-{pod}",
            env.RANKS_PER_POD: str(PER_POD),
            env.WORLD_SIZE: str(WORLD),
            env.MASTER_ADDR: hosts[0],
            env.MASTER_PORT: str(master_port),
            env.BACKEND: "gloo",
            env.DEVICE: "cpu",
            env.BIND_ADDRESS: host,
            env.HTTP_PORT: str(port),
            env.API_PORT: str(api_port),
            env.TOKEN_PATH: str(tmp_path / "token"),
            env.KV_CACHE_TOKENS: "256",
            env.STALL_TIMEOUT: "4",
            env.COLLECTIVE_TIMEOUT: "20",
        }
        logs.append(tmp_path / f"pod{pod}.log")
        with logs[-1].open("wb") as out:
            command = [sys.executable, "-m", "moe_worker.main", "serve"]
            procs.append(subprocess.Popen(command, env=variables, stdout=out, stderr=out))
    found = Pods(procs, hosts, port, api_port, logs)
    try:
        for pod in range(PODS):
            found.wait(f"pod {pod} ready", lambda p=pod: request(found.url(p, "/readyz"))[0] == 200)
        yield found
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_a_pod_answers_for_its_ranks(pods: Pods) -> None:
    """Probes, metrics (every series labelled by rank), the plan through local rank 0, the API
    on global rank 0 only."""
    for pod in range(PODS):
        status, health = request(pods.url(pod, "/healthz"))
        assert status == 200 and [r["rank"] for r in health["ranks"]] == [2 * pod, 2 * pod + 1]
        status, ready = request(pods.url(pod, "/readyz"))
        assert status == 200 and ready["planVersion"] == 1, ready
        status, text = request(pods.url(pod, "/metrics"))
        assert status == 200
        found = samples(text)
        assert all("rank" in labels for _, labels, _ in found), [n for n, lb, _ in found][:5]
        ranks = {labels["rank"] for _, labels, _ in found}
        assert ranks == {str(2 * pod), str(2 * pod + 1)}
        tokens = [labels for name, labels, _ in found if name == "moe_expert_tokens_total"]
        assert {labels["rank"] for labels in tokens} == ranks
        up = {lb["rank"]: v for name, lb, v in found if name == "moe_pod_rank_up"}
        assert up == dict.fromkeys(ranks, 1.0)

    # /v1/plan reaches local rank 0: on pod 0 the leader, on pod 1 a rank that is not.
    assert request(pods.url(1, "/v1/plan"))[0] == 401  # the token passes through to the rank
    status, plan = request(pods.url(1, "/v1/plan"), token=TOKEN)
    assert status == 200 and plan["version"] == 1
    nxt = round_robin_plan(SHAPE.layers, SHAPE.experts, WORLD, 2)
    document = {**nxt.to_document(), "version": 2}
    assert request(pods.url(1, "/v1/plan"), document, TOKEN)[0] == 421
    assert request(pods.url(0, "/v1/plan"), document, "wrong")[0] == 401
    status, answer = request(pods.url(0, "/v1/plan"), document, TOKEN)
    assert status == 200 and answer["applied"] and answer["version"] == 2, answer
    for pod in range(PODS):
        _, text = request(pods.url(pod, "/metrics"))
        versions = {lb["rank"]: v for n, lb, v in samples(text) if n == "moe_plan_version"}
        assert versions == {str(2 * pod): 2.0, str(2 * pod + 1): 2.0}

    # The membership too (the operator reads it and reports lost pods to the leader's pod).
    status, group = request(pods.url(0, "/v1/group"))
    assert status == 200 and group["liveRanks"] == list(range(WORLD)), group
    lost = {"ranks": [0], "reason": "test"}
    assert request(pods.url(0, "/v1/group/lost"), lost, TOKEN)[0] == 400  # never the leader
    assert request(pods.url(1, "/v1/group/lost"), lost, TOKEN)[0] == 421

    # The OpenAI-compatible API: global rank 0, on pod 0's address; nobody else listens.
    body = {"model": "seedmlp-synthetic", "prompt": [1, 2, 3], "max_tokens": 3}
    api = f"http://{pods.hosts[0]}:{pods.api_port}/v1"
    status, models = request(f"{api}/models")
    assert status == 200, models
    body["model"] = models["data"][0]["id"]
    status, completion = request(f"{api}/completions", body)
    assert status == 200 and len(completion["choices"][0]["token_ids"]) == 3, completion
    with pytest.raises(OSError):
        request(f"http://{pods.hosts[1]}:{pods.api_port}/v1/models")


def test_a_stopped_rank_fails_its_pods_probe_and_stalls_the_others(pods: Pods) -> None:
    """SIGSTOP rank 3: its pod's /healthz names it (no answer); the other pod's ranks stall in
    their collectives and the watchdog says so; SIGKILL it: its pod exits non-zero, and the
    other pod too (its collectives fail), as a container would, for the group to come back."""
    _, health = request(pods.rank_url(3, "/healthz"))
    victim = health["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        _, health = pods.wait(
            "pod 1 not live", lambda: (a := request(pods.url(1, "/healthz")))[0] == 503 and a, 30
        )
        assert {r["rank"]: r["status"] for r in health["ranks"]}[3] == "no answer", health

        def stalled() -> dict[str, Any] | None:
            status, health = request(pods.url(0, "/healthz"))
            states = {r["status"] for r in health["ranks"]}
            return health if status == 503 and states == {"stalled"} else None

        pods.wait("the watchdog on both ranks of pod 0", stalled, 60)
    finally:
        os.kill(victim, signal.SIGKILL)
    assert pods.procs[1].wait(60) != 0, pods.log(1)
    assert pods.procs[0].wait(90) != 0, pods.log(0)


def test_pod_ranks_take_global_ranks_and_internal_ports() -> None:
    """Pod 3 of 4-rank pods: ranks 12..15, GPUs 0..3, control apps on internal ports of the
    pod's loopback, the API on global rank 0 only."""
    environ = {
        env.POD_NAME: "seed-3",
        env.RANKS_PER_POD: "4",
        env.WORLD_SIZE: "16",
        env.HTTP_PORT: "8080",
    }
    settings = settings_from_env(environ)
    assert (settings.rank, settings.ranks_per_pod) == (12, 4)
    ranks = LocalRanks(settings.ranks_per_pod, settings.rank, settings.world_size)
    children = [pod_rank_settings(settings, ranks, local) for local in range(4)]
    assert [(c.rank, c.local_rank, c.world_size) for c in children] == [
        (12 + i, i, 16) for i in range(4)
    ]
    assert [c.http_port for c in children] == [8081, 8082, 8083, 8084]
    assert {c.control_address for c in children} == {"127.0.0.1"}
    assert all(c.api_port == 0 and c.bind_address == "0.0.0.0" for c in children)
    pod = WorkerSettings(bind_address="0.0.0.0", ranks_per_pod=2, world_size=4)
    leader = pod_rank_settings(pod, LocalRanks(2), 0)
    assert (leader.rank, leader.api_port, leader.bind_address) == (0, 8000, "0.0.0.0")
    local = WorkerSettings(bind_address="127.9.8.7", ranks_per_pod=2, world_size=4)
    assert pod_rank_settings(local, LocalRanks(2), 1).control_address == "127.9.8.7"
