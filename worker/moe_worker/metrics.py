"""Prometheus metrics of one worker, in a per-process registry (several workers may share a process
in tests). Expert token counts are read from the dispatcher's counter buffer at scrape time rather
than incremented per step, so the hot path never touches prometheus-client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

EXPERT_TOKENS = "moe_expert_tokens"  # exposed as moe_expert_tokens_total{layer,expert}

CountsReader = Callable[[], Sequence[Sequence[int]]]
"""Returns counts[layer][expert]: tokens this rank processed for that logical expert."""


class ExpertTokensCollector(Collector):
    def __init__(self, read_counts: CountsReader) -> None:
        self.read_counts = read_counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            EXPERT_TOKENS,
            "Tokens this rank processed for each (layer, logical expert).",
            labels=["layer", "expert"],
        )
        for layer, row in enumerate(self.read_counts()):
            for expert, count in enumerate(row):
                family.add_metric([str(layer), str(expert)], count)
        yield family


class WorkerMetrics:
    """All metrics of one worker; the runtime updates them, the server exposes the registry."""

    def __init__(self, read_counts: CountsReader) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ExpertTokensCollector(read_counts))
        r = self.registry
        self.plan_version = Gauge(
            "moe_plan_version", "Version of the plan being served.", registry=r
        )
        self.ready = Gauge(
            "moe_worker_ready", "1 once the group formed and the plan is loaded.", registry=r
        )
        self.step_latency = Histogram(
            "moe_step_latency_seconds",
            "Wall time of one forward step of this rank.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.tokens = Counter(
            "moe_tokens_processed",
            "Tokens of this rank's own sequences run through the model.",
            registry=r,
        )
        self.switch_pause = Histogram(
            "moe_plan_switch_pause_seconds",
            "Serving pause of each plan switch (weights moved and all ranks resynchronised).",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.last_switch_pause = Gauge(
            "moe_plan_switch_last_pause_seconds",
            "Serving pause of the latest plan switch.",
            registry=r,
        )
        self.experts_moved = Counter(
            "moe_experts_moved",
            "Expert weights this rank received during plan switches.",
            registry=r,
        )
