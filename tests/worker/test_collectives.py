"""The serving loop's two collectives carry any text: short ones in one fixed-size frame, long ones
(many long prompts admitted at once) with a second message for the rest, on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from worker_harness import run_world

from moe_worker.ep import group

pytestmark = pytest.mark.distributed

LONG = "é" * (group.INLINE_BYTES)  # two bytes each: twice the frame, split inside a character


def exchange(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in (("short", '{"step":1}'), ("long", LONG)):
        out[f"broadcast_{name}"] = group.broadcast_text(text if rank == 0 else None)
    out["gather_short"] = group.gather_text(f"rank {rank}")
    out["gather_mixed"] = group.gather_text(LONG if rank == 1 else f"rank {rank}")
    return out


def test_texts_of_any_length_reach_every_rank(tmp_path: Path) -> None:
    for r, result in enumerate(run_world(exchange, 2, tmp_path)):
        assert result["broadcast_short"] == '{"step":1}', r
        assert result["broadcast_long"] == LONG
        assert result["gather_short"] == ["rank 0", "rank 1"]
        assert result["gather_mixed"] == ["rank 0", LONG]
