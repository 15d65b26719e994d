"""The leader's readiness is the `-api` Service's: ready only while the whole group serves."""

from __future__ import annotations

import time

from moe_contract.shape import ModelShape
from moe_worker.models.weights import SyntheticWeights
from moe_worker.runtime.rank import Runtime
from moe_worker.runtime.state import LEADER_READY_STALL_S
from moe_worker.serving.generation import Backend
from moe_worker.settings import WorkerSettings

SHAPE = ModelShape(layers=1, experts=2, hidden=8, ffn_hidden=8, heads=2, head_dim=4, top_k=1)


def serving(rank: int, since_last_step: float) -> Backend:
    """A rank past its group's barrier, its last step `since_last_step` seconds ago."""
    settings = WorkerSettings(rank=rank, world_size=2, model=SHAPE)
    rank_runtime = Runtime(settings, SyntheticWeights.for_shape(SHAPE, seed=0))
    rank_runtime.state.serving = True  # what run() sets after the barrier
    rank_runtime.state.last_step = time.monotonic() - since_last_step
    return rank_runtime.backend


def test_a_leader_whose_group_stopped_stepping_is_not_ready() -> None:
    stalled = LEADER_READY_STALL_S + 1
    assert serving(0, since_last_step=0.0).is_ready()
    assert not serving(0, since_last_step=stalled).is_ready()  # a peer hangs: no step
    assert serving(0, since_last_step=stalled).is_live()  # not yet a restart: it may heal
    # Other ranks report their own state only: the Service follows the leader's.
    assert serving(1, since_last_step=stalled).is_ready()


def test_a_stalled_leader_takes_no_requests() -> None:
    from moe_worker.serving.generation import GenerationRequest, NotReady, SamplingParams

    leader = serving(0, since_last_step=LEADER_READY_STALL_S + 1)
    request = GenerationRequest("r", (1, 2), SamplingParams(temperature=0, max_tokens=1))
    try:
        leader.submit(request, lambda _event: None)
    except NotReady:
        return
    raise AssertionError("a stalled group accepted a request")
