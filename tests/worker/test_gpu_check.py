"""`make gpu-check` on the CPU: it refuses without CUDA; every part runs at tiny sizes through the
same code a GPU runs (CUDA behind `Device`), and its figures say what they should; the runner
keeps what a failing, dying or hanging part recorded; the report renders partial figures, and
its calibration block is what `moe-ep perf` calibrates from. No timings are asserted."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_operator.perf.calibrate import calibrate
from moe_operator.perf.profiles import load_profile
from moe_worker.bench.gpu_check import check, grouped, report
from moe_worker.bench.gpu_check.check import PARTS, Part, run_part, run_parts, select
from moe_worker.bench.gpu_check.device import Device, describe
from moe_worker.bench.gpu_check.record import Recorder

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_run() -> dict[str, dict[str, Any]]:
    """Every part once, in this process, at its TINY sizes on the CPU, as the runner keeps them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for part in PARTS:
            module = __import__(part.module, fromlist=["run"])
            out = Recorder()
            module.run(out, Device("cpu"), module.TINY)
            results[part.name] = {"key": part.key, "title": part.title, "status": "ok",
                                  "seconds": 1.0, "figures": out.data}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return results


def test_it_refuses_without_cuda_and_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--out", str(tmp_path / "out")]) == check.NO_CUDA == 3
    captured = capsys.readouterr()
    assert captured.out.startswith("gpu-check found: python ")  # what it found, first
    assert "torch " + torch.__version__ in captured.out
    assert "needs a CUDA GPU and found none" in captured.err
    assert "docs/gpu-results.md" in captured.err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Device("cuda")


def test_parts_are_chosen_by_letter_or_name() -> None:
    assert [p.name for p in select("a,grouped")] == ["parity", "grouped"]
    assert sorted(p.key for p in select(None)) == list("abcdef")
    with pytest.raises(ValueError, match="unknown z; choose from a/parity"):
        select("z")
    assert sum(p.budget_s for p in PARTS) <= check.DEADLINE_S <= 8 * 60 - 30


def test_the_cpu_device_frees_ballast_with_its_last_reference_as_cuda_does() -> None:
    device = Device("cpu", cpu_memory_budget=10_000)
    ballast = device.allocate(4_000)
    alias = ballast
    assert device.free_bytes() == 6_000
    del ballast
    assert device.free_bytes() == 6_000  # still referenced
    del alias
    assert device.free_bytes() == 10_000
    ran: list[int] = []
    assert device.on_side_stream(lambda: ran.append(1)) is None and ran == [1]  # in order
    assert device.peak() is None and device.allocated() is None  # not measured off CUDA


def test_parity_equals_transformers(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["parity"]["figures"]
    assert set(figures["cases"]) == {"mixtral_float32", "qwen3_moe_float32"}
    for case in figures["cases"].values():
        assert case["served_dtype"] == "float32" and case["kernel"] == "loop"
        assert case["generations_equal"] == case["prompts"] == 2
        assert case["logits_max_abs_diff"] < 1e-4 < case["logits_max_abs"]
    assert figures["ok"] is True


def test_grouped_gemm_cases_and_the_memory_guard(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["grouped"]["figures"]
    assert figures["served_kernel"] == "loop"
    for case in figures["cases"].values():
        assert case["rows"] == 40 and case["fraction_of_dense"] > 0
        assert case["moe_tflops"] == case["loop_tflops"]  # the served kernel on the CPU
        if "grouped_mm_ms" in case:  # torch's CPU fallback: the same products
            assert case["grouped_mm_max_abs_diff_vs_loop"] < 1e-5
    assert figures["attention"]["attention_tflops"] > 0
    # A case that would not fit the free memory is skipped with what it needed, not run.
    out = Recorder()
    grouped.run(out, Device("cpu", cpu_memory_budget=1000), grouped.TINY)
    skipped = out.data["cases"]["seed_ep16_rank"]
    assert skipped["skipped"].startswith("needs about 0.0 GiB, 0.0 GiB free")
    # The seed's EP16 rank in bf16: its slot and the dense weights, then input, hidden state and
    # two outputs per row.
    weights, rows = 2 * 2 * 4096 * 16384, 160_000 * (3 * 4096 + 16384)
    assert grouped.case_bytes(grouped.GPU.cases[0], torch.bfloat16) == 2 * (weights + rows)


def test_serving_against_generate(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["serving"]["figures"]
    for system in ("moe_ep", "transformers"):
        assert set(figures[system]) == {"1", "2"}
        for c in figures[system].values():
            assert c["output_tokens_per_s"] > 0 and c["ttft_p99_s"] >= c["ttft_p50_s"] > 0
    ratio = figures["tokens_per_s_over_transformers"]["2"]
    ours, theirs = figures["moe_ep"]["2"], figures["transformers"]["2"]
    assert ratio == pytest.approx(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"])


def test_switch_pauses_and_decode_steps(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["switch"]["figures"]
    assert figures["decode_step_ms"] > 0 and figures["decode_step_ms_after"] > 0
    cases = figures["cases"]
    assert [c["slots_rewritten_per_layer"] for c in cases.values()] == [2, 4, 5]
    for case in cases.values():
        assert case["pause_ms"] >= case["pause_host_ms"] > 0


def test_overlap_through_the_all_to_all_path(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["overlap"]["figures"]
    assert figures["backend"] == "gloo" and figures["check"]["ok"] is True
    assert list(figures["links"]) == ["none", "nvlink_450GBps", "infiniband_50GBps"]
    for link in figures["links"].values():
        assert link["two_batch_max_abs_diff"] < 1e-4  # the emulated link changes no output
    assert figures["links"]["none"]["comm_ms"] == 0.0
    assert 0.0 <= figures["overlap_efficiency"] <= 1.0


def test_overlap_figures_and_what_perf_takes() -> None:
    from moe_worker.bench.gpu_check.overlap import calibration_efficiency, overlap_figures

    f = overlap_figures(without_s=0.030, with_s=0.022, compute_s=0.020)
    assert f["comm_ms"] == pytest.approx(10.0) and f["speedup"] == pytest.approx(30 / 22)
    assert f["efficiency"] == pytest.approx(0.8)  # 8 ms hidden of min(20, 10)
    links = {"none": {"efficiency": 0.0}, "nvlink_450GBps": {"efficiency": 0.7},
             "infiniband_50GBps": {"efficiency": 1.3}}  # fmt: skip
    assert calibration_efficiency(links) == pytest.approx(0.7)  # the lower, clamped; not "none"


def test_the_free_memory_check(tiny_run: dict[str, dict[str, Any]]) -> None:
    figures = tiny_run["memory"]["figures"]
    assert figures["tracks_allocation"]["ok"] and figures["ok"]
    refuse = figures["refuse"]
    assert refuse["refused"] and refuse["stacks_unchanged"]
    assert refuse["free_mib_with_ballast"] < refuse["needed_mib"]
    assert refuse["message"].startswith("slotsPerRank: plan 3 (6 slots per rank")
    assert figures["grow"]["logits_max_abs_diff"] < 1e-5  # a replica changes no output
    assert "measured_peak_mib" not in figures["grow"]  # not measured off CUDA


def test_the_report_and_what_moe_ep_perf_reads(tiny_run: dict[str, dict[str, Any]]) -> None:
    environment = {**describe(), "gpu": "NVIDIA H200"}
    doc = report.document(environment, tiny_run, {"command": "x", "started": "now"})
    assert next(iter(doc)) == "calibration"
    cal = doc["calibration"]
    rank = tiny_run["grouped"]["figures"]["cases"]["seed_ep16_rank"]
    assert cal["matmul_tflops"] == rank["dense_tflops"]
    assert cal["moe_fraction_of_matmul"] == rank["fraction_of_dense"]
    assert cal["overlap_efficiency"] == tiny_run["overlap"]["figures"]["overlap_efficiency"]
    text = report.markdown(json.loads(json.dumps(doc)))  # as read back from the file
    for part in PARTS:
        assert f"## ({part.key}) {part.name}" in text
    assert "| (b) grouped |" in text and "FAIL" not in text
    assert report.perf_command(doc).startswith("moe-ep perf --profile h200 ")
    assert report.all_ok(doc)
    profile = load_profile("h200")
    calibrated = calibrate(profile, bench=doc, gpu_check=doc).profile.hardware
    peak = profile.hardware.peak_flops
    assert calibrated.expert_efficiency == pytest.approx(cal["expert_tflops"] * 1e12 / peak)
    assert calibrated.overlap_efficiency == pytest.approx(cal["overlap_efficiency"])


def test_the_report_renders_a_part_stopped_midway() -> None:
    parts = {
        "grouped": {"key": "b", "title": "t", "status": "timeout", "error": "stopped at 100 s",
                    "figures": {"cases": {"seed_layer_1k": {"slots": 16}}}},
        "memory": {"key": "f", "title": "t", "status": "skipped", "error": "no time"},
    }  # fmt: skip
    doc = report.document({}, parts, {})
    text = report.markdown(doc)
    assert "| (b) grouped | t | timeout: stopped at 100 s |" in text
    assert "(figures incomplete)" in text and doc["calibration"] == {}
    assert not report.all_ok(doc)


def test_the_runner_keeps_what_a_part_recorded_before_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    budgets = {"failing": 60.0, "dying": 60.0, "hanging": 1.0, "finishing": 60.0}
    results: dict[str, dict[str, Any]] = {}

    def one(name: str) -> None:
        part = Part("x", name, f"gpu_check_fake_parts:{name}", budgets[name], name)
        results[name] = run_part(part, tmp_path, budgets[name], "none", tiny=True)

    threads = [threading.Thread(target=one, args=(name,)) for name in budgets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["failing"]["status"] == "error"
    assert results["failing"]["error"] == "ValueError: planted failure"
    assert "planted failure" in results["failing"]["traceback"]
    assert results["dying"]["status"] == "crashed" and "exit code 7" in results["dying"]["error"]
    assert results["hanging"]["status"] == "timeout"
    for name, first in (("failing", 1.5), ("dying", 2.5)):
        assert results[name]["figures"] == {"first": first}
    assert results["hanging"]["figures"] in ({}, {"first": 3.5})  # killed at 1 s, wherever it was
    assert results["finishing"]["status"] == "ok"
    assert results["finishing"]["figures"] == {"cases": {"one": {"ok": True}}, "ok": True}
    # No time left under the deadline: the part is skipped, nothing is started.
    skipped = run_parts([PARTS[0]], deadline_s=1.0, device="none", tiny=True)
    assert skipped["parity"]["status"] == "skipped"
