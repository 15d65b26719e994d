"""Calibration from worker JSON, the bundled profiles, the CLI, and the purity of the model."""

from __future__ import annotations

import json

import pytest

from moe_operator.cli import perf as perf_cli
from moe_operator.perf.calibrate import calibrate, flatten
from moe_operator.perf.profiles import (
    PROFILE_DIR,
    load_profile,
    profile_from_dict,
    profile_to_yaml,
)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [2, {"d": 3.5}]}, "e": "x", "f": True}) == {
        "a.b": 1.0,
        "a.c.0": 2.0,
        "a.c.1.d": 3.5,
    }


def test_calibrate_from_gpu_check_and_bench(h100):
    gpu = {
        "device": "H100",
        "attention": {"ms": 12.0, "tflops": 494.7},
        "expert": {"ms": 80.0, "achieved_tflops": 593.6},
        "matmul": {"attention_shapes": {"tflops": 700.0}, "expert_shapes": {"TFLOPs": 742.0}},
    }
    bench = {
        "layouts": {"ep4": {"tokens_per_s": 1200.0}, "tp2xpp2": {"tokens_per_s": 900.0}},
        "moe_vs_matmul_fraction": 0.5,
        "plan_switch_pause_ms": 40.0,
    }
    cal = calibrate(h100, bench=bench, gpu_check=gpu)
    hw = cal.profile.hardware
    assert hw.matmul_efficiency == pytest.approx(742e12 / 989.4e12)
    assert hw.attention_efficiency == pytest.approx(494.7e12 / 989.4e12)
    assert hw.expert_efficiency == pytest.approx(593.6e12 / 989.4e12)  # gpu_check wins over bench
    measured = dict(cal.measured)
    assert measured["tokens_per_s_ep"] == 1200.0
    assert measured["tokens_per_s_tp_pp"] == 900.0
    assert measured["plan_switch_s"] == pytest.approx(0.04)
    assert cal.profile.source("attention_efficiency").startswith("calibrated")


def test_calibrate_bench_fraction_only(h100):
    cal = calibrate(h100, bench={"moe_flops_fraction_of_matmul": 0.5})
    assert cal.profile.hardware.expert_efficiency == pytest.approx(0.7 * 0.5)
    assert any("attention_efficiency" in n for n in cal.notes)


def test_calibrate_tolerates_nonsense(h100):
    cal = calibrate(h100, bench={"weird": [1, "x", None]}, gpu_check={"matmul": {"tflops": -1}})
    assert cal.profile.hardware == h100.hardware
    assert any("ignored" in n for n in cal.notes)


def test_calibrate_clamps_above_peak(h100):
    cal = calibrate(h100, gpu_check={"matmul_tflops": 2000.0})
    assert cal.profile.hardware.matmul_efficiency == 1.0


@pytest.mark.parametrize("name", ["h100-sxm", "h200", "cpu-local"])
def test_bundled_profiles_have_a_source_for_every_figure(name):
    prof = load_profile(name)
    for key in (
        "peak_flops",
        "memory_bandwidth",
        "memory_capacity",
        "matmul_efficiency",
        "inter_bandwidth",
        "intra_latency",
        "gpus_per_node",
    ):
        assert prof.source(key) != "unspecified", key
    assert prof.hardware.peak_flops > 0


def test_profile_round_trip(h100):
    import yaml

    again = profile_from_dict(yaml.safe_load(profile_to_yaml(h100)))
    assert again.hardware == h100.hardware and again.network == h100.network
    assert again.sources == h100.sources


def test_unknown_profile_and_figure():
    with pytest.raises(FileNotFoundError, match="h100-sxm"):
        load_profile("nope")
    with pytest.raises(ValueError, match="unknown"):
        profile_from_dict({"hardware": {"peak_flopz": 1}})
    assert sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) == ["cpu-local", "h100-sxm", "h200"]


def test_cli_table(capsys):
    assert perf_cli.main([]) == 0
    out = capsys.readouterr().out
    for text in (
        "tokens/s (prefill)",
        "TPOT ms (decode)",
        "ratio",
        "FLOP ceiling fraction",
        "bound by",
        "datasheet: NVIDIA H100 SXM",
        "overlap",
        "seed claim",
        "one more expert slot per rank: 4.3 GB per GPU",
    ):
        assert text in out


def test_cli_json_and_calibration(tmp_path, capsys):
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"attention": {"tflops": 400.0}}))
    saved = tmp_path / "cal.yaml"
    rc = perf_cli.main(
        [
            "--json",
            "--phase",
            "decode",
            "--profile",
            "h200",
            "--imbalance",
            "1.3",
            "--gpu-check-json",
            str(gpu),
            "--save-profile",
            str(saved),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["layout"] for p in doc["predictions"]] == ["ep16", "tp8pp2"]
    assert "ep16/tp8pp2" in doc["ratios"]["decode"]
    assert doc["assumptions"]["figures"]["memory_bandwidth"]["value"] == 4.8e12
    ep16 = doc["predictions"][0]["memory_bytes"]
    assert ep16["per_expert_slot"] == 16 * 2 * 4096 * 16384 * 2  # bf16 experts of 16 layers
    assert ep16["slots_per_rank"] == 1 and ep16["spare_slots"] >= 1
    assert load_profile(str(saved)).hardware.attention_efficiency == pytest.approx(400 / 989.4)


def test_cli_errors(capsys):
    assert perf_cli.main(["--layouts", "bogus"]) == 2
    assert perf_cli.main(["--layouts", "ep4s2"]) == 2  # 4 ranks x 2 slots < 16 experts
    assert "moe-ep perf" in capsys.readouterr().err


def test_calibrate_takes_the_measured_overlap_efficiency(h100):
    bench = {
        "switch_pause_s": 0.1,
        "switch_pause_nonblocking_s": 0.002,
        "overlap_speedup": 1.1,
        "overlap_efficiency": 0.4,
        "overlap": {"comm_heavy": {"efficiency": 0.9}},
    }
    cal = calibrate(h100, bench=bench)
    assert cal.profile.hardware.overlap_efficiency == pytest.approx(0.4)
    assert cal.profile.source("overlap_efficiency").startswith("calibrated")
    measured = dict(cal.measured)
    assert measured["plan_switch_s"] == pytest.approx(0.1)
    assert measured["plan_switch_nonblocking_s"] == pytest.approx(0.002)
    none = calibrate(h100, bench={"overlap": {"bench_shape": {"efficiency": 0.0}}})
    assert none.profile.hardware.overlap_efficiency == 0.0  # a measured zero is kept
    assert h100.hardware.overlap_efficiency == 0.0  # bundled: none until measured


def test_cli_uses_the_calibrated_overlap_unless_told(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"overlap_efficiency": 1.0}))
    runs = {}
    for name, extra in (("calibrated", []), ("none", ["--overlap", "0"]), ("plain", None)):
        args = ["--json", "--phase", "prefill"]
        args += [] if extra is None else ["--bench-json", str(bench), *extra]
        assert perf_cli.main(args) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert runs["calibrated"]["assumptions"]["overlap"] == 1.0
    assert runs["none"]["assumptions"]["overlap"] == 0.0
    ep16 = {k: r["predictions"][0]["tokens_per_s"] for k, r in runs.items()}
    assert ep16["calibrated"] > ep16["none"] == pytest.approx(ep16["plain"])


def test_a_document_with_a_calibration_block_is_read_from_it_alone(h100):
    """gpu-check.json: the block `make gpu-check` writes first, and many other figures besides
    (rates under names calibrate would otherwise match) that must not count."""
    doc = {
        "calibration": {
            "matmul_tflops": 700.0,
            "expert_tflops": 560.0,
            "moe_fraction_of_matmul": 0.8,
            "attention_tflops": 450.0,
            "overlap_efficiency": 0.6,
        },
        "parts": {
            "grouped": {"cases": {"x": {"dense_tflops": 900.0, "moe_tflops": 880.0}}},
            "serving": {"moe_ep": {"1": {"output_tokens_per_s": 5.0}}},
            "overlap": {"links": {"nvlink": {"efficiency": 0.1}}},
        },
    }
    cal = calibrate(h100, bench=doc, gpu_check=doc)
    hw = cal.profile.hardware
    assert hw.matmul_efficiency == pytest.approx(700e12 / 989.4e12)
    assert hw.expert_efficiency == pytest.approx(560e12 / 989.4e12)
    assert hw.attention_efficiency == pytest.approx(450e12 / 989.4e12)
    assert hw.overlap_efficiency == pytest.approx(0.6)
    measured = dict(cal.measured)
    assert measured["moe_vs_matmul"] == pytest.approx(0.8)
    assert "tokens_per_s_ep" not in measured
