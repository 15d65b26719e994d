"""Plans that grow the slots per rank, and the memory they need: a plan above the group's
maxSlotsPerRank (MOE_MAX_SLOTS_PER_RANK) is refused with the field and the fix; a rank that has
not the memory a switch needs (measured on CUDA; injected here) refuses it before moving
anything, and the leader answers that as HTTP 422 ("does not fit"), not as a transfer to retry.
That a grown plan applies online and changes no output is test_ep_parity's Replace switch (one
more slot per rank, at worlds 1, 2 and 4) and tests/e2e.
"""

from __future__ import annotations

import pytest
import torch

from moe_contract.plan import Plan, PlanError, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.ep.engine import EPEngine
from moe_worker.models.weights import SyntheticWeights
from moe_worker.runtime.rank import Runtime
from moe_worker.settings import WorkerSettings, settings_from_env
from moe_worker.switch.mover import ExpertMover, switch_bytes
from moe_worker.switch.switcher import BackgroundSwitcher

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, kv_heads=2, vocab_size=64
)
SOURCE = SyntheticWeights.for_shape(SHAPE, seed=5)


def grown(version: int = 2) -> Plan:
    """World 1: the four experts, then a replica of expert 0 in a fifth slot."""
    slots = tuple(((0, 1, 2, 3, 0),) for _ in range(SHAPE.layers))
    return Plan(version=version, slotsPerRank=5, slots=slots, method="Replace")


def test_switch_bytes_count_staging_added_slots_and_one_layer_rebuilt() -> None:
    assert switch_bytes(4, 4, layers=2, received=3, expert_bytes=10) == 30  # in place
    assert switch_bytes(1, 2, layers=3, received=2, expert_bytes=10) == (2 + 3 + 1) * 10
    assert switch_bytes(2, 1, layers=3, received=0, expert_bytes=10) == 20  # shrinking


def test_a_rank_without_the_memory_refuses_the_plan_with_the_fix() -> None:
    engine = EPEngine(SOURCE, round_robin_plan(SHAPE.layers, SHAPE.experts, 1, 4), rank=0)
    assert engine.expert_bytes == 2 * 32 * 48 * 4  # SeedMLP: two fp32 matrices
    mover = ExpertMover(engine, free_bytes=lambda: engine.expert_bytes)  # one slot; needs four
    with pytest.raises(PlanError) as refused:
        mover.start(grown(), group=None)
    message = str(refused.value)
    assert message.startswith("slotsPerRank: plan 2 (5 slots per rank")
    assert "placement.maxSlotsPerRank" in message and "moe-ep perf" in message
    assert engine.stacks.experts(0) == (0, 1, 2, 3)  # nothing changed
    # The peak: a fifth slot in both layers, and one layer's old four slots until regrown.
    mover.free_bytes = lambda: 6 * engine.expert_bytes
    assert mover.apply(grown()) == 0  # a local copy: nothing travels at world 1
    assert engine.stacks.experts(1) == (0, 1, 2, 3, 0)
    assert torch.equal(engine.stacks.layer(1)[0][4], engine.stacks.layer(1)[0][0])


def test_the_leader_refuses_a_plan_above_max_slots_per_rank() -> None:
    settings = settings_from_env({"MOE_WORLD_SIZE": "1", "MOE_MAX_SLOTS_PER_RANK": "4"})
    assert settings.max_slots_per_rank == 4
    settings = WorkerSettings(model=SHAPE, max_slots_per_rank=4)
    backend = Runtime(settings, SOURCE).backend
    backend.validate_plan(round_robin_plan(SHAPE.layers, SHAPE.experts, 1, 4, version=2))
    with pytest.raises(PlanError, match=r"slotsPerRank: 5 exceeds the 4 slots per rank"):
        backend.validate_plan(grown())


def test_a_switch_a_rank_could_not_start_for_memory_is_answered_422() -> None:
    engine = EPEngine(SOURCE, round_robin_plan(SHAPE.layers, SHAPE.experts, 1, 4), rank=0)
    switcher = BackgroundSwitcher(ExpertMover(engine, lambda: 0), world_size=1, timeout_s=10.0)
    switcher.start(grown())
    state = switcher.state()
    assert state is not None and state.startswith("failed: PlanError: slotsPerRank")
    answer = switcher.abandon(f"rank 0: {state}")  # what the leader sends every rank
    assert answer.reason == "does not fit" and answer.error and "B free" in answer.error
    assert answer.http_status == 422
    failed = switcher.abandon("rank 0: failed: RuntimeError: peer gone")  # worth another try
    assert (failed.reason, failed.http_status) == ("transfer failed", 503)
