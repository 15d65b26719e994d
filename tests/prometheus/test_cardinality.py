"""Series a DeepSeek-scale deployment puts in Prometheus, per metrics.expertSeries mode.

58 MoE layers x 256 experts on EP64 with 5 slots per rank (320 slots a layer: 64 redundant),
each rank's /metrics built by the worker's own registry and exposition (stand-in counters), then
what the PodMonitor keeps: PerRank all of it, PerLayer without moe_expert_tokens_total (its
metricRelabelings; test_prometheus_rules checks that rule is there). docs/rebalancing.md, "At
scale", has the table.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from moe_contract.plan import round_robin_plan
from moe_worker.metrics import WorkerMetrics, exposition

LAYERS, EXPERTS, RANKS, SLOTS = 58, 256, 64, 5


def series_by_name() -> Counter[str]:
    plan = round_robin_plan(LAYERS, EXPERTS, RANKS, SLOTS)
    counts = [[1] * EXPERTS for _ in range(LAYERS)]
    reroutes = ([0] * LAYERS, [0.0] * LAYERS)
    names: Counter[str] = Counter()
    for rank in range(RANKS):
        held = [set(plan.slots[layer][rank]) for layer in range(LAYERS)]
        metrics = WorkerMetrics(lambda: counts, lambda held=held: held, lambda: reroutes)
        text = exposition(metrics.registry, rank).decode()
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
    return names


def test_series_at_deepseek_scale() -> None:
    names = series_by_name()
    per_expert = names["moe_expert_tokens_total"]
    # a series per expert a rank holds: 5 distinct experts a rank and layer in this plan
    assert per_expert == LAYERS * RANKS * SLOTS == 18_560
    assert names["moe_layer_tokens_total"] == LAYERS * RANKS == 3_712
    per_rank = sum(names.values())
    per_layer = per_rank - per_expert  # the PodMonitor drops moe_expert_tokens_total
    # were every (layer, expert) exported by every rank it would be 58 x 256 x 64 = 950,272
    assert per_expert < LAYERS * EXPERTS * RANKS / 50
    assert per_layer < per_rank / 2
    rerouted = names["moe_gate_rerouted_total"] + names["moe_gate_rerouted_weight_total"]
    assert rerouted == 2 * LAYERS * RANKS
    assert per_layer - names["moe_layer_tokens_total"] - rerouted < 60 * RANKS  # the rest
