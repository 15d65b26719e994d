"""Prometheus metrics of one worker, in a per-process registry (several workers may share a process
in tests). Every series carries the rank's `rank` label (`exposition`): a pod of several ranks
answers for all of them on one port, and Prometheus and the operator tell them apart by it.
Expert token counts are read from the dispatcher's counter buffer at scrape time rather
than incremented per step, so the hot path never touches prometheus-client, and a scrape never
waits on the serving loop.

`moe_gate_rerouted_total{layer}` and `moe_gate_rerouted_weight_total{layer}` are the price of the
plan's gate bias (GatingBias rebalancing): top-K assignments of this rank's tokens whose expert is
not the model's own choice, and the gate probability they lost, read the same way from the
engine's counters. A series per layer from the start (zero without a bias); the denominator of a
rerouted fraction is the layer's `moe_expert_tokens_total` summed over experts and ranks.

`moe_expert_tokens_total{layer,expert}` has a series for every expert this rank holds under the
plan it serves, and only for those: at most L x S series a rank (58 x 5 = 290 at DeepSeek scale
on EP64), where every series a rank ever held would grow towards L x E (14,848) over plan
switches. A switch changes the set, and the operator skips the one window whose two reads differ
in it, as it does for the series a switch adds. `moe_layer_tokens_total{layer}` is their sum per
layer, L series a rank: all a dashboard needs for the per-layer imbalance (max / mean over ranks),
and all Prometheus keeps of a deployment whose `metrics.expertSeries` is PerLayer (the
PodMonitor drops the per-expert series of its pods; the operator still reads them directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_worker.serving.generation import TokenEvent

EXPERT_TOKENS = "moe_expert_tokens"  # exposed as moe_expert_tokens_total{rank,layer,expert}
LAYER_TOKENS = "moe_layer_tokens"  # exposed as moe_layer_tokens_total{rank,layer}
GATE_REROUTED = "moe_gate_rerouted"  # exposed as moe_gate_rerouted_total{rank,layer}
GATE_REROUTED_WEIGHT = "moe_gate_rerouted_weight"  # moe_gate_rerouted_weight_total{rank,layer}
RANK_LABEL = "rank"

CountsReader = Callable[[], Sequence[Sequence[int]] | None]
"""counts[layer][expert]: tokens this rank processed for that logical expert; None before load."""
HeldReader = Callable[[], Sequence[set[int]]]
"""Per layer, the logical experts this rank holds now."""
ReroutesReader = Callable[[], tuple[Sequence[int], Sequence[float]] | None]
"""(rerouted assignments [L], lost gate probability [L]) so far; None before load."""


class ExpertTokensCollector(Collector):
    def __init__(self, read_counts: CountsReader, read_held: HeldReader) -> None:
        self.read_counts, self.read_held = read_counts, read_held

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            EXPERT_TOKENS,
            "Tokens this rank processed for each (layer, logical expert) it holds.",
            labels=["layer", "expert"],
        )
        per_layer = CounterMetricFamily(
            LAYER_TOKENS,
            "Tokens this rank processed in each layer (all its experts).",
            labels=["layer"],
        )
        counts = self.read_counts()
        if counts is not None:
            held = self.read_held()
            for layer, row in enumerate(counts):
                per_layer.add_metric([str(layer)], sum(row))
                for expert in sorted(held[layer]) if layer < len(held) else ():
                    family.add_metric([str(layer), str(expert)], row[expert])
        yield family
        yield per_layer


class GateReroutesCollector(Collector):
    def __init__(self, read_reroutes: ReroutesReader) -> None:
        self.read_reroutes = read_reroutes

    def collect(self) -> Iterator[Metric]:
        rerouted = CounterMetricFamily(
            GATE_REROUTED,
            "Top-K assignments of this rank's tokens that the gate bias moved off the model's "
            "own choice, per layer.",
            labels=["layer"],
        )
        weight = CounterMetricFamily(
            GATE_REROUTED_WEIGHT,
            "Gate probability those rerouted assignments gave up, per layer.",
            labels=["layer"],
        )
        read = self.read_reroutes()
        if read is not None:
            for layer, (count, lost) in enumerate(zip(*read, strict=True)):
                rerouted.add_metric([str(layer)], count)
                weight.add_metric([str(layer)], lost)
        yield rerouted
        yield weight


class WorkerMetrics:
    """All metrics of one worker; the runtime updates them, the HTTP layer exposes the registry."""

    def __init__(
        self,
        read_counts: CountsReader,
        read_held: HeldReader,
        read_reroutes: ReroutesReader = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ExpertTokensCollector(read_counts, read_held))
        self.registry.register(GateReroutesCollector(read_reroutes))
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
        self.kv_free_tokens = Gauge(
            "moe_kv_cache_free_tokens", "Free token slots of this rank's KV cache.", registry=r
        )
        self.sequences = Gauge(
            "moe_sequences_running", "Sequences whose KV cache this rank keeps.", registry=r
        )
        # Leader only (the scheduler and the API's view of requests).
        self.requests_waiting = Gauge(
            "moe_requests_waiting", "Requests waiting for a KV cache budget (leader).", registry=r
        )
        self.requests_running = Gauge(
            "moe_requests_running", "Requests admitted and not finished (leader).", registry=r
        )
        self.requests_finished = Counter(
            "moe_requests_finished",
            "Requests that ended, by finish reason (leader).",
            labelnames=["reason"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "moe_generated_tokens", "Tokens generated for requests (leader).", registry=r
        )
        # The group's membership (a member lost, or back).
        self.group_epoch = Gauge(
            "moe_group_epoch",
            "Membership epoch this rank serves in (grows each time a rank is lost or joins).",
            registry=r,
        )
        self.group_live_ranks = Gauge(
            "moe_group_live_ranks", "Ranks in the group this rank serves in.", registry=r
        )
        self.requests_resumed = Counter(
            "moe_requests_resumed",
            "Requests resumed on another rank after theirs was lost (leader).",
            registry=r,
        )

    def count_delivery(self, event: TokenEvent) -> None:
        """An event the leader handed to a request's sink: its tokens, and how it ended."""
        self.generated_tokens.inc(len(event.token_ids))
        if event.finish_reason is not None:
            self.requests_finished.labels(event.finish_reason).inc()


class _WithRank(Collector):
    """A registry's metrics with `rank` added to the labels of every sample."""

    def __init__(self, registry: CollectorRegistry, rank: int) -> None:
        self.registry, self.rank = registry, str(rank)

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [
                sample._replace(labels={RANK_LABEL: self.rank, **sample.labels})
                for sample in metric.samples
            ]
            yield labelled


def exposition(registry: CollectorRegistry, rank: int) -> bytes:
    """Prometheus text of `registry`, every series labelled with `rank`."""
    return generate_latest(_WithRank(registry, rank))
