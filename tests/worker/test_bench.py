"""`moe-worker bench` runs both layouts end to end (tiny shapes; no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_worker.bench import BenchOptions, format_table, run_bench
from moe_worker.shape import ModelShape

pytestmark = pytest.mark.distributed


def test_bench_reports_both_layouts(tmp_path: Path) -> None:
    options = BenchOptions(
        model=ModelShape(layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8),
        batch=4,
        seq_len=8,
        steps=1,
        micro_batches=2,
    )
    result = run_bench(options, json_path=str(tmp_path / "bench.json"))
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["ep"]["layout"] == "EP4" and result["tppp"]["layout"] == "TP2xPP2"
    assert result["ep"]["tokens_per_s"] > 0 and result["tppp"]["tokens_per_s"] > 0
    assert result["switch_pause_s"] > 0
    assert "EP / TPxPP" in format_table(result)


def test_bench_serving_reports_moe_ep_and_transformers(tmp_path: Path) -> None:
    from moe_worker.bench_serving import ServingOptions, run_serving_bench

    options = ServingOptions(worlds=(1,), concurrency=(1, 2), requests=3, max_tokens=3)
    result = run_serving_bench(options, json_path=str(tmp_path / "serving.json"))
    systems = json.loads((tmp_path / "serving.json").read_text())["systems"]
    assert set(systems) == {"moe-ep world 1", "transformers generate()"}
    for figures in result["systems"].values():
        assert set(figures) == {1, 2}
        assert all(f["output_tokens_per_s"] > 0 and f["ttft_p50_s"] > 0 for f in figures.values())
