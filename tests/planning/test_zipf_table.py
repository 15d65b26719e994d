"""The Zipf table script: deterministic loads and a table that reflects the planners."""

from __future__ import annotations

import pytest

from moe_operator.cli.zipf_table import (
    TOKENS_PER_LAYER,
    format_table,
    main,
    zipf_loads,
    zipf_rows,
)


def test_zipf_loads_are_skewed_permuted_per_layer_and_deterministic() -> None:
    loads = zipf_loads(4, 8, 1.0)
    assert loads == zipf_loads(4, 8, 1.0)
    assert all(abs(sum(row) - TOKENS_PER_LAYER) < 1e-3 for row in loads)
    for row in loads:
        ordered = sorted(row, reverse=True)
        assert ordered[0] / ordered[1] == pytest.approx(2.0)  # 1/1 vs 1/2
    assert len({row.index(max(row)) for row in loads}) > 1  # hot expert differs across layers


def test_rows_use_gating_bias_without_spare_slots_and_replace_with_them() -> None:
    rows = zipf_rows((1.0,), (1, 2), ranks=8, layers=2, experts=8)
    seed, spare = rows
    assert (seed.method, seed.after, seed.slots_moved) == ("GatingBias", None, 0)
    assert spare.method == "Replace"
    assert spare.after is not None and spare.after < spare.before
    table = format_table(rows, ranks=8, layers=2)
    assert "not predicted (bias applied)" in table
    assert table.count("\n") == 3


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ranks", "4", "--layers", "1", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Zipf s | slotsPerRank |")
    assert out.count("\n") == 2 + 9
