"""`moe-ep gating-sim`: the worker's router and the operator's planner, side by side."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from moe_local import gating_sim
from moe_local.gating_sim import least_imbalance
from moe_operator.cli import main as moe_ep

SMALL = ["--experts", "4", "--ranks", "4", "--layers", "2", "--tokens", "3000"]


@pytest.fixture(scope="module")
def results() -> list[dict]:
    argv = ["gating-sim", "--zipf", "1.0", *SMALL, "--evaluations", "8", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert moe_ep(argv) == 0  # through the `moe_ep.commands` entry point
    document = json.loads(out.getvalue())
    assert document["layout"] == {
        "experts": 4,
        "ranks": 4,
        "slots_per_rank": 1,
        "top_k": 2,
        "layers": 2,
    }
    return document["results"]


def _row(results: list[dict], prefix: str) -> dict:
    (row,) = [r for r in results if r["setting"].startswith(prefix)]
    return row


def test_every_setting_sees_the_same_traffic(results: list[dict]) -> None:
    assert len({r["before"] for r in results}) == 1
    assert all(len(r["history"]) == 9 for r in results)  # the unbiased window + 8 evaluations


def test_a_spare_slot_balances_without_rerouting_anything(results: list[dict]) -> None:
    spare = _row(results, "spare slot")
    assert spare["slots_per_rank"] == 2 and spare["slots_moved"] > 0
    assert spare["rerouted_peak"] == 0 and spare["lost_weight_per_token"] == 0
    assert spare["after"] < spare["before"]


def test_the_defaults_keep_the_measured_price_under_the_cap(results: list[dict]) -> None:
    defaults = _row(results, "damped, the defaults")
    assert defaults["max_rerouted_fraction"] == 0.1 and defaults["max_margin"] == 0.05
    assert 0 < defaults["rerouted_peak"] <= 0.1
    assert defaults["after"] < defaults["before"]


def test_a_higher_cap_buys_more_balance_at_a_higher_price(results: list[dict]) -> None:
    low, high = (
        _row(results, "damped, no guard, cap 0.05"),
        _row(results, "damped, no guard, no cap"),
    )
    assert low["rerouted_fraction"] < high["rerouted_fraction"]
    assert high["after"] < low["after"]
    for row in (low, high):  # the bound is a bound
        assert row["least_at_that_price"] <= row["after"] + 1e-9


def test_the_table_has_one_row_per_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert gating_sim.main(["--zipf", "0.5", *SMALL, "--evaluations", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| Zipf s | setting | imbalance before | after 1 evaluations")
    assert len(lines) == 2 + len(gating_sim.default_settings(gating_sim.Layout(4, 4, 1, 2, 2)))


@pytest.mark.parametrize(
    "argv",
    [["--top-k", "4", "--experts", "4"], ["--experts", "8", "--ranks", "4"], ["--zipf", "x"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert gating_sim.main(argv) == 2
    assert "moe-ep gating-sim:" in capsys.readouterr().err


def test_least_imbalance_moves_the_budget_from_the_hottest_experts() -> None:
    # 60 assignments, mean 15: moving 10 of them (1/6) brings the hottest from 30 down to 20
    assert least_imbalance([30.0, 10.0, 10.0, 10.0], 1 / 6) == pytest.approx(20 / 15)
    assert least_imbalance([30.0, 10.0, 10.0, 10.0], 0.0) == pytest.approx(2.0)
    assert least_imbalance([30.0, 10.0, 10.0, 10.0], 1.0) == pytest.approx(1.0)


def _run(*extra: str) -> dict:
    out = io.StringIO()
    argv = ["--zipf", "1.0", *SMALL, "--evaluations", "4", "--json", *extra]
    with contextlib.redirect_stdout(out):
        assert gating_sim.main(argv) == 0
    return json.loads(out.getvalue())


def test_a_sigmoid_router_starts_from_the_models_own_bias() -> None:
    plain = _run("--router", "sigmoid")
    biased = _run("--router", "sigmoid", "--model-bias", "0.5")
    assert biased["router"] == {
        "scoring": "sigmoid",
        "model_bias": 0.5,
        "groups": 1,
        "topk_groups": 1,
    }
    before = {d["results"][0]["before"] for d in (plain, biased)}
    # the checkpoint's bias lifts the cold experts: the model alone is less imbalanced
    assert biased["results"][0]["before"] < plain["results"][0]["before"] and len(before) == 2
    defaults = _row(biased["results"], "damped, the defaults")
    assert 0 < defaults["rerouted_peak"] <= 0.1  # the operator's bias, on top, under its cap
    assert defaults["after"] < defaults["before"]


@pytest.mark.parametrize(
    "argv",
    [["--model-bias", "0.5"], ["--router", "sigmoid", "--groups", "3"], ["--topk-groups", "2"]],
)
def test_router_arguments_that_do_not_fit_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert gating_sim.main([*SMALL, *argv]) == 2
    assert "moe-ep gating-sim: --" in capsys.readouterr().err
