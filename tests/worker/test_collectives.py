"""The serving loop's messages carry any text: short ones in one fixed-size frame, long ones (many
long prompts admitted at once) with a second message for the rest, broadcast to every rank,
gathered from every rank, or sent to one rank alone. And the harness that forks the ranks of
every distributed test leaves them nothing of the parent's garbage to destroy."""

from __future__ import annotations

import gc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from worker_harness import free_port, run_world

from moe_worker.ep import group

pytestmark = pytest.mark.distributed

LONG = "é" * (group.INLINE_BYTES)  # two bytes each: twice the frame, split inside a character


def exchange(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in (("short", '{"step":1}'), ("long", LONG)):
        out[f"broadcast_{name}"] = group.broadcast_text(text if rank == 0 else None)
    out["gather_short"] = group.gather_text(f"rank {rank}")
    out["gather_mixed"] = group.gather_text(LONG if rank == 1 else f"rank {rank}")
    for name, text in (("short", "[1]"), ("long", LONG)):  # to rank 1 alone
        if rank == 0:
            group.send_texts({1: text})
        else:
            out[f"sent_{name}"] = group.recv_text(0)
    return out


def test_texts_of_any_length_reach_every_rank(tmp_path: Path) -> None:
    for r, result in enumerate(run_world(exchange, 2, tmp_path)):
        assert result["broadcast_short"] == '{"step":1}', r
        assert result["broadcast_long"] == LONG
        assert result["gather_short"] == ["rank 0", "rank 1"]
        assert result["gather_mixed"] == ["rank 0", LONG]
        if r == 1:
            assert (result["sent_short"], result["sent_long"]) == ("[1]", LONG)


class LeftoverStore:
    """What a world-1 runtime that ran in the test process used to leave: its rendezvous store's
    server (a thread of its own) reachable only through a reference cycle."""

    def __init__(self) -> None:
        self.store = dist.TCPStore(
            "127.0.0.1",
            free_port(),
            1,
            is_master=True,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
        self.cycle = self


def collect_then_reduce(rank: int, world: int) -> dict[str, Any]:
    gc.collect()  # the rank's first full collection, early and certain
    total = torch.ones(1)
    dist.all_reduce(total)
    return {"total": total.item()}


def test_ranks_destroy_nothing_of_the_parents_garbage(tmp_path: Path) -> None:
    """Destroying the inherited store in a rank aborted it (`std::system_error`, while
    garbage-collecting) or hung it: every distributed test forked after an in-process runtime
    errored (tests/worker/test_distributed_equivalence.py after test_bench.py)."""
    LeftoverStore()
    assert run_world(collect_then_reduce, 2, tmp_path, timeout=60) == [{"total": 2.0}] * 2
