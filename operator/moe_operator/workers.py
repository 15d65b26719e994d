"""The real doors of `rebalance.control_step`: worker pods found through the API server."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from moe_operator import handoff, loads
from moe_operator.api import MoEDeploymentSpec
from moe_operator.kube import Cluster
from moe_operator.manifests import children
from moe_worker import env as worker_env
from moe_worker.plan import Plan


@dataclass
class PodWorkers:
    """Workers of one MoEDeployment, addressed by pod IP (as kubelets and Prometheus do)."""

    cluster: Cluster
    namespace: str
    name: str
    spec: MoEDeploymentSpec

    @functools.cached_property
    def _addresses(self) -> dict[int, str]:
        """rank -> base URL, listed once per control step (one PodWorkers serves one step)."""
        pods = self.cluster.list_pods(self.namespace, children.selector_labels(self.name))
        addresses = {}
        for pod in pods:
            rank = worker_env.rank_from_pod_name(pod["metadata"]["name"])
            ip = (pod.get("status") or {}).get("podIP")
            if rank is not None and ip and not pod["metadata"].get("deletionTimestamp"):
                addresses[rank] = f"http://{ip}:{self.spec.worker.port}"
        return addresses

    def _leader(self) -> str:
        leader = self._addresses.get(0)
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
        targets = [loads.Target(rank, f"{url}/metrics") for rank, url in self._addresses.items()]
        return loads.read_direct(
            targets,
            world_size=self.spec.parallelism.world_size,
            num_layers=model.layers,
            num_experts=model.experts_per_layer,
        )

    def serving_version(self) -> int:
        return handoff.serving_version(self._leader())

    def post_plan(self, plan: Plan) -> handoff.HandoffResult:
        token = self.cluster.read_secret_value(
            self.namespace, children.token_secret_name(self.name), worker_env.TOKEN_FILE_NAME
        )
        if token is None:
            raise handoff.HandoffError("control-token Secret is missing")
        return handoff.post_plan(self._leader(), plan, token)
