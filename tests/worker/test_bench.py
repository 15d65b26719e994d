"""`moe-worker bench` runs both layouts and the data path's figures end to end (tiny shapes; no
timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_contract.shape import ModelShape
from moe_worker.bench.command import BenchOptions, format_table, run_bench

pytestmark = pytest.mark.distributed


def test_bench_reports_both_layouts(tmp_path: Path) -> None:
    tiny = ModelShape(layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8)
    options = BenchOptions(
        model=tiny,
        batch=4,
        seq_len=8,
        steps=1,
        micro_batches=2,
        comm_model=tiny.replace(ffn_hidden=8),
        comm_batch=4,
        comm_seq_len=4,
    )
    result = run_bench(options, json_path=str(tmp_path / "bench.json"))
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["ep"]["layout"] == "EP4" and result["tppp"]["layout"] == "TP2xPP2"
    assert result["ep"]["tokens_per_s"] > 0 and result["tppp"]["tokens_per_s"] > 0
    assert result["grouped_gemm_kernel"] == "loop"
    figures = (
        "moe_fraction_of_matmul",
        "moe_fraction_of_dense_ffn",
        "experts_fraction_of_dense_ffn",
        "overlap_speedup",
        "overlap_speedup_comm_heavy",
    )
    assert all(result[key] > 0 for key in figures)
    for shape in ("bench_shape", "comm_heavy", "decode"):  # CPU time of every thread, both ways
        figures_of = result["overlap"][shape]
        assert figures_of["process_cpu_s_with"] > 0 and figures_of["process_cpu_s_without"] > 0
        ratio = figures_of["process_cpu_s_with"] / figures_of["process_cpu_s_without"]
        assert figures_of["cpu_ratio"] == pytest.approx(ratio)
    assert 0 <= result["overlap_efficiency"] <= 1
    assert result["switch_pause_s"] > 0 and result["switch_pause_nonblocking_s"] > 0
    assert result["steps_during_switch"] >= 1 and result["step_s_during_switch"] > 0
    assert "EP / TPxPP" in format_table(result)


def test_bench_serving_reports_moe_ep_and_transformers(tmp_path: Path) -> None:
    from moe_worker.bench.serving import ServingOptions, format_table, run_serving_bench

    options = ServingOptions(
        worlds=(1,), concurrency=(1, 2), requests=3, output_tokens=(2, 4), runs=2
    )
    result = run_serving_bench(options, json_path=str(tmp_path / "serving.json"))
    systems = json.loads((tmp_path / "serving.json").read_text())["systems"]
    assert set(systems) == {"moe-ep world 1", "transformers generate()"}
    for figures in result["systems"].values():
        assert set(figures) == {1, 2}
        runs = [run for per_concurrency in figures.values() for run in per_concurrency]
        assert len(runs) == 4
        assert all(f["output_tokens_per_s"] > 0 and f["ttft_p50_s"] > 0 for f in runs)
    assert format_table(result).count("x\n") + 1 == 8  # a ratio on every row of both systems
