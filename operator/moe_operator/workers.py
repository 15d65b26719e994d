"""The real doors of `rebalance.control_step`: worker pods found through the API server."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_contract import env as worker_env
from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator import handoff, loads
from moe_operator.api import MoEDeploymentSpec


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
        token = self.token()
        if token is None:
            raise handoff.HandoffError("control-token Secret is missing")
        return handoff.report_lost(self._leader(), ranks, reason, token)

    def post_plan(self, plan: Plan) -> handoff.HandoffResult:
        return handoff.post_plan(self._leader(), plan, self._token())

    def _token(self) -> str:
        """The control token every /v1/plan request bears (GET included)."""
        token = self.token()
        if token is None:
            raise handoff.HandoffError("control-token Secret is missing")
        return token
