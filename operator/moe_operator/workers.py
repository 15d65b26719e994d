"""The real doors of `rebalance.control_step`: worker pods found through the API server."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_contract import env as worker_env
from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator import handoff, loads
from moe_operator.api import MoEDeploymentSpec

MAX_READYZ_BYTES = 64 * 1024
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod IPs: no proxy


@dataclass
class PodWorkers:
    """Workers of one MoEDeployment, addressed by pod IP (as kubelets and Prometheus do).

    `pods` are the StatefulSet's own pods (controller reference checked): a look-alike pod is
    never scraped nor sent the token. The token comes from the deployment's own Secret.
    """

    pods: list[dict[str, Any]]
    spec: MoEDeploymentSpec
    namespace: str
    name: str
    token: Callable[[], str | None]
    read_timeout: float = 3.0
    """Seconds one pod's /metrics may take; the whole read at most twice that."""

    @functools.cached_property
    def _addresses(self) -> dict[int, str]:
        """pod's first rank -> base URL (one PodWorkers serves one control step)."""
        addresses = {}
        per_pod = self.spec.worker.local_ranks()
        for pod in self.pods:
            ordinal = worker_env.rank_from_pod_name(pod["metadata"]["name"])
            ip = (pod.get("status") or {}).get("podIP")
            if ordinal is not None and ip and not pod["metadata"].get("deletionTimestamp"):
                rank = worker_env.pod_ranks(ordinal, per_pod).start
                addresses[rank] = f"http://{ip}:{self.spec.worker.port}"
        return addresses

    def _leader(self) -> str:
        leader = self._addresses.get(0)  # pod 0 passes /v1/plan to its local rank 0: rank 0
        if leader is None:
            raise handoff.HandoffError("rank 0 has no pod address yet")
        return leader

    def read_counters(self) -> loads.CounterSnapshot:
        model = self.spec.model
        if self.spec.metrics.source == "Prometheus":
            return loads.read_prometheus(
                self.spec.metrics.prometheus_url,
                self.namespace,
                self.name,
                world_size=self.spec.parallelism.world_size,
                num_layers=model.layers,
                num_experts=model.experts_per_layer,
            )
        per_pod = self.spec.worker.local_ranks()
        targets = [
            loads.Target(rank, f"{url}/metrics", per_pod) for rank, url in self._addresses.items()
        ]
        return loads.read_direct(
            targets,
            world_size=self.spec.parallelism.world_size,
            num_layers=model.layers,
            num_experts=model.experts_per_layer,
            timeout=self.read_timeout,
        )

    def serving(self) -> handoff.Served:
        return handoff.serving(self._leader(), self._token())

    def served_plan(self) -> Plan | None:
        """The leader's whole plan, or None when it cannot be had (recovery falls back)."""
        try:
            return handoff.served_plan(self._leader(), self._token())
        except handoff.HandoffError:
            return None

    def group(self) -> GroupStatus | None:
        """The leader's membership (None: the group has none of its own). HandoffError: the
        leader did not answer."""
        return handoff.group_status(self._leader())

    def report_lost(self, ranks: list[int], reason: str) -> bool:
        return handoff.report_lost(self._leader(), ranks, reason, self._token())

    def post_plan(self, plan: Plan) -> handoff.HandoffResult:
        return handoff.post_plan(self._leader(), plan, self._token())

    def _token(self) -> str:
        """The control token every /v1/plan request bears (GET included)."""
        token = self.token()
        if token is None:
            raise handoff.HandoffError("control-token Secret is missing")
        return token


@dataclass
class GroupsWorkers:
    """Several replica groups behind one `rebalance.Workers`: they serve one model on one plan.

    Token counts are summed rank by rank over the groups (the same plan places the same experts
    on rank r of every group, and the router spreads the same traffic over them), so the plan
    is computed once for all. A plan is handed to one group's leader after another: each POST
    returns once that group switched, so at most one group pauses for a switch at a time.
    What they serve is the least advanced group's plan: the plan is applied once all have it.
    """

    groups: list[PodWorkers]

    def read_counters(self) -> loads.CounterSnapshot:
        if self.groups[0].spec.metrics.source == "Prometheus":  # its query sums the groups
            return self.groups[0].read_counters()
        snapshots = [group.read_counters() for group in self.groups]
        counters: dict[int, dict[Any, float]] = {}
        rerouted: dict[int, dict[int, float]] = {}
        for snapshot in snapshots:
            for rank, values in snapshot.counters.items():
                into = counters.setdefault(rank, {})
                for key, value in values.items():
                    into[key] = into.get(key, 0.0) + value
            for rank, layers in snapshot.rerouted.items():
                into_layers = rerouted.setdefault(rank, {})
                for layer, value in layers.items():
                    into_layers[layer] = into_layers.get(layer, 0.0) + value
        versions = {
            rank: min(s.plan_versions[rank] for s in snapshots if rank in s.plan_versions)
            for rank in {rank for s in snapshots for rank in s.plan_versions}
        }
        return loads.CounterSnapshot(counters, versions, rerouted)

    def serving(self) -> handoff.Served:
        served = [group.serving() for group in self.groups]
        return min(served, key=lambda item: item.version)

    def post_plan(self, plan: Plan) -> handoff.HandoffResult:
        result = handoff.HandoffResult(plan.version, None)
        pauses: list[float] = []
        for group in self.groups:  # one group at a time: the next waits for this one's switch
            answer = group.post_plan(plan)
            if answer.stale:
                served = group.serving()
                if served.version != plan.version or served.digest != plan.digest():
                    return answer  # the caller judges what this group serves
            elif answer.pause_seconds is not None:
                pauses.append(answer.pause_seconds)
        return handoff.HandoffResult(result.applied_version, max(pauses) if pauses else None)

    def served_versions(self) -> list[int | None]:
        """Each group's served plan version (None: its leader did not say)."""
        found: list[int | None] = []
        for group in self.groups:
            try:
                found.append(group.serving().version)
            except handoff.HandoffError:
                found.append(None)
        return found


def leader_in_flight(pod: dict[str, Any], port: int, timeout: float = 2.0) -> int | None:
    """Requests waiting or running on a group's leader, or None when it does not answer: what a
    drain waits for. The leader's GET /readyz says it (`inFlight`, the worker's drain contract;
    200 or 503 alike); workers that do not (older ones) are read from pod 0's merged /metrics.
    /readyz first: a read of /metrics is no scrape of the loads (the rebalancing windows')."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    found = _readyz_in_flight(f"http://{ip}:{port}/readyz", timeout)
    if found is not None:
        return found
    try:
        text = loads.fetch_text(f"http://{ip}:{port}/metrics", timeout)
    except loads.LoadReadError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("moe_requests_waiting", "moe_requests_running")):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                return None
    return int(total)


def _readyz_in_flight(url: str, timeout: float) -> int | None:
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            body = response.read(MAX_READYZ_BYTES)
    except urllib.error.HTTPError as error:  # 503: not ready, or draining: the body says
        body = error.read(MAX_READYZ_BYTES)
    except (OSError, ValueError):
        return None
    try:
        found = json.loads(body).get("inFlight")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, int) and not isinstance(found, bool) else None
