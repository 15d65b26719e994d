"""The worker's token series: one per expert a rank holds now, and one per layer.

Pure: prometheus_client's registry with stand-in readers, no model and no process group.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_worker.metrics import WorkerMetrics


def _series(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("moe_expert_tokens_total", "moe_layer_tokens_total")
    }


def test_only_held_experts_have_series_and_layers_keep_their_totals() -> None:
    counts = [[5, 0, 7, 0], [0, 3, 0, 0]]
    held = [{0, 2}, {1}]
    metrics = WorkerMetrics(lambda: counts, lambda: held)
    series = _series(metrics)
    assert series == {
        ("moe_expert_tokens_total", (("expert", "0"), ("layer", "0"))): 5,
        ("moe_expert_tokens_total", (("expert", "2"), ("layer", "0"))): 7,
        ("moe_expert_tokens_total", (("expert", "1"), ("layer", "1"))): 3,
        ("moe_layer_tokens_total", (("layer", "0"),)): 12,
        ("moe_layer_tokens_total", (("layer", "1"),)): 3,
    }
    # a plan switch: expert 2 of layer 0 moves away, expert 3 arrives; counts only grow
    counts[0][3], counts[0][0] = 4, 6
    held[0] = {0, 3}
    series = _series(metrics)
    assert ("moe_expert_tokens_total", (("expert", "2"), ("layer", "0"))) not in series
    assert series[("moe_expert_tokens_total", (("expert", "3"), ("layer", "0")))] == 4
    assert series[("moe_layer_tokens_total", (("layer", "0"),))] == 17  # 6 + 7 + 4: monotonic


def test_before_the_model_is_loaded_there_are_no_token_series() -> None:
    assert _series(WorkerMetrics(lambda: None, list)) == {}
