"""`moe-ep plan` end to end: in process via main([...]) and as `python -m`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_contract.plan import parse_plan, round_robin_plan, validate_plan
from moe_operator.cli.plan import main

SUMMARY = re.compile(
    r"^imbalance (\d+\.\d\d) -> (\d+\.\d\d|not predicted), (\d+) slots moved \((\w+)\)"
)
LOADS = {"expert_load": [[700, 100, 100, 100], [100, 100, 100, 700]]}


def write(tmp_path: Path, name: str, document: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def test_replace_prints_a_plan_workers_accept_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loads = write(tmp_path, "loads.json", LOADS)
    assert main(["--loads", str(loads), "--ranks", "4", "--slots-per-rank", "2"]) == 0
    out, err = capsys.readouterr()
    plan = parse_plan(out)
    validate_plan(plan, num_layers=2, num_experts=4, world_size=4)
    assert json.loads(out) == plan.to_document()  # exactly the document, nothing else
    assert plan.version == 2 and plan.method == "Replace" and plan.slots_per_rank == 2
    match = SUMMARY.match(err)
    assert match, err
    before, after, moved, method = match.groups()
    # Round-robin start: rank r holds experts r and r+1, each expert split over 2 replicas, so
    # layer 0's rank loads are 400, 100, 100, 400 -> max/mean = 1.60.
    assert (before, method) == ("1.60", "Replace")
    assert float(after) < 2.8 and int(moved) > 0
    assert err.count("\n") == 1


def test_previous_plan_and_gating_bias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loads = write(tmp_path, "loads.json", LOADS)
    previous = write(tmp_path, "plan.json", round_robin_plan(2, 4, 4, 1, version=9).to_json())
    argv = [
        "--loads",
        str(loads),
        "--ranks",
        "4",
        "--slots-per-rank",
        "1",
        "--previous",
        str(previous),
        "--rate",
        "0.05",
        "--max-bias",
        "0.2",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    plan = parse_plan(out)
    assert plan.version == 10 and plan.method == "GatingBias"
    assert plan.gate_bias is not None and plan.gate_max_margin == 0.05  # the default guard
    assert plan.gate_bias[0][0] < 0 < min(plan.gate_bias[0][1:])  # the hot expert goes down
    assert plan.gate_bias[1][3] < 0 < min(plan.gate_bias[1][:3])
    assert "not predicted" in err and "(GatingBias)" in err and "not output-preserving" in err

    assert main([*argv[:6], "--method", "replace", "--previous", str(previous)]) == 0
    out, err = capsys.readouterr()
    assert parse_plan(out).version == 9  # unchanged: the previous plan as it is
    assert "nothing to replicate" in err


def test_round_robin_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loads = write(tmp_path, "loads.json", LOADS)
    argv = [
        "--loads",
        str(loads),
        "--ranks",
        "8",
        "--slots-per-rank",
        "1",
        "--method",
        "round-robin",
    ]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert parse_plan(out) == round_robin_plan(2, 4, 8, 1)


@pytest.mark.parametrize(
    ("loads", "extra", "message"),
    [
        ({"expert_load": [[1, 2], [1]]}, [], "expert_load[1]: has 1 experts, expected 2"),
        ({"loads": [[1, 2]]}, [], "expert_load: missing"),
        ({"expert_load": [[1, -2]]}, [], "expert_load[0][1]: must be finite and >= 0"),
        ("{not json", [], "not JSON"),
        ({"expert_load": [[1, 2, 3]]}, [], "slotsPerRank: 2 ranks x 1 slots cannot hold 3"),
        ({"expert_load": [[1, 2]]}, ["--rate", "-1"], "rate: must be a finite number >= 0"),
        ({"expert_load": [[1, 2]]}, ["--rerouted", "0.1,0.2"], "rerouted_fraction: has 2 layers"),
        (
            {"expert_load": [[1, 2]]},
            ["--max-slots-per-rank", "0"],
            "maxSlotsPerRank: 0 is below slotsPerRank 1",
        ),
        ({"expert_load": [[1, 2]]}, ["--ranks", "x"], "argument --ranks: invalid int value"),
        ({"expert_load": [[1, 2]]}, ["--method", "magic"], "argument --method: invalid choice"),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loads: object,
    extra: list[str],
    message: str,
) -> None:
    path = write(tmp_path, "loads.json", loads)
    argv = ["--loads", str(path), "--ranks", "2", "--slots-per-rank", "1", *extra]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_bad_previous_plan_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loads = write(tmp_path, "loads.json", {"expert_load": [[1, 2]]})
    bad = write(tmp_path, "plan.json", {"version": 0, "slotsPerRank": 1, "slots": [[[0], [1]]]})
    argv = ["--loads", str(loads), "--ranks", "2", "--slots-per-rank", "1"]
    assert main([*argv, "--previous", str(bad)]) == 2
    assert "--previous" in capsys.readouterr().err
    other = write(tmp_path, "other.json", round_robin_plan(1, 2, 2, 2).to_json())
    assert main([*argv, "--previous", str(other)]) == 2
    assert "slotsPerRank: 2 exceeds the 1 slots per rank" in capsys.readouterr().err
    assert main([*argv, "--max-slots-per-rank", "2", "--previous", str(other)]) == 0  # grown
    assert main(["--loads", str(tmp_path / "nope.json"), *argv[2:]]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    loads = write(tmp_path, "loads.json", LOADS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_operator.cli.plan",
            "--loads",
            str(loads),
            "--ranks",
            "4",
            "--slots-per-rank",
            "2",
            "--method",
            "replace",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    validate_plan(parse_plan(done.stdout), num_layers=2, num_experts=4, world_size=4)
    assert SUMMARY.match(done.stderr)
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_operator.cli.plan",
            "--loads",
            str(loads),
            "--ranks",
            "3",
            "--slots-per-rank",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 2 and failed.stdout == ""
    assert "cannot hold 4 experts" in failed.stderr


def test_ranks_per_pod_routes_by_pod_and_reports_the_cross_pod_fraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loads = write(tmp_path, "loads.json", LOADS)
    argv = ["--loads", str(loads), "--ranks", "4", "--slots-per-rank", "2"]
    assert main([*argv, "--ranks-per-pod", "2"]) == 0
    out, err = capsys.readouterr()
    plan = parse_plan(out)
    assert plan.ranks_per_pod == 2
    # round-robin, no pods: every expert's tokens spread over all replicas, half leave the pod
    found = re.search(r"cross-pod (\d+\.\d)% -> (\d+\.\d)% of assignments", err)
    assert found, err
    before, after = map(float, found.groups())
    assert before == 50.0 and after < before
    assert main([*argv, "--ranks-per-pod", "3"]) == 2
    assert "ranksPerPod: 3 does not divide the 4 ranks" in capsys.readouterr().err
