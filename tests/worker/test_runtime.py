"""The serving runtime on two forked gloo ranks (synthetic SeedMLP), driven through the leader's
Backend: sampling equals the world-1 generator's, a request one rank fails ends alone while the
group keeps serving, the waiting queue is bounded, aborts, stop tokens, plan-switch answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_harness import run_world
from worker_serving_cases import Driver, greedy, serve_group

from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.generator import Generator, Request
from moe_worker.ep.runner import ModelRunner
from moe_worker.models.weights import SyntheticWeights
from moe_worker.runtime.rank import Runtime
from moe_worker.serving.generation import (
    GenerationRequest,
    InvalidRequest,
    NotReady,
    QueueFull,
    SamplingParams,
)
from moe_worker.serving.step import Chunk
from moe_worker.settings import WorkerSettings

pytestmark = pytest.mark.distributed

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, kv_heads=2, vocab_size=80
)
SETTINGS = WorkerSettings(
    model=SHAPE, seed=11, kv_cache_tokens=64, max_batch_tokens=6, max_queued_requests=3
)
SAMPLED = [
    (
        tuple(range(3, 3 + n)),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=k, seed=100 + n, max_tokens=7),
    )
    for n, k in ((4, 0), (9, 20), (1, 5))
]


def lead(driver: Driver) -> dict[str, Any]:
    results: dict[str, Any] = {}
    backend = driver.backend
    results["sampled"] = [o.tokens for o in driver.run(SAMPLED)]

    first = driver.run([greedy((5, 6, 7), 5)])[0].tokens
    stop = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(first[2],))
    stopped = driver.run([((5, 6, 7), stop)])[0]
    results["stop"] = (first, stopped.tokens, stopped.finish)

    # A request a rank fails ("bad" raises in that rank's runner) ends alone.
    outcomes = driver.run([greedy((1, 2, 3), 6), greedy((9, 9), 6), greedy((4, 5), 6)])
    results["failing"] = [(o.tokens, o.finish, o.error) for o in outcomes]
    results["after_failure"] = driver.run([greedy((9, 9), 6)])[0].tokens

    # Two requests take both ranks' whole budget; three wait; the next one is refused (429).
    hogs = [driver.submit(*greedy((1, 2), 30)) for _ in range(2)]
    while not all(h.tokens for h in hogs):
        time.sleep(0.01)
    waiting = [driver.submit(*greedy((3,), 4)) for _ in range(3)]
    try:
        driver.submit(*greedy((3,), 4))
        results["queue_full"] = None
    except QueueFull as error:
        results["queue_full"] = (error.status, str(error))
    try:
        driver.submit(*greedy((3,), 200))
    except InvalidRequest as error:
        results["too_long"] = (error.status, error.param)
    backend.abort(hogs[0].request_id)
    for outcome in (*hogs, *waiting):
        assert outcome.done.wait(120)
    results["hogs"] = [(len(h.tokens), h.finish) for h in hogs]
    results["waiting"] = [w.finish for w in waiting]

    plan = backend.current_plan()
    assert plan is not None
    results["stale"] = backend.switch_plan(plan, timeout=30).to_document()
    results["live"] = backend.is_live()
    results["metrics"] = backend.metrics_text().decode()
    return results


def failing_rank(rank: int, world: int) -> dict[str, Any]:
    original = ModelRunner._new_tokens

    def new_tokens(self: ModelRunner, chunk: Chunk) -> list[int]:
        if chunk.request_id == "req-6":  # the first request of the failing batch
            raise RuntimeError("injected bug")
        return original(self, chunk)

    ModelRunner._new_tokens = new_tokens  # type: ignore[method-assign]  (this forked rank only)
    return serve_group(rank, world, SETTINGS, lead)


@pytest.fixture(scope="module")
def leader(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_world(failing_rank, 2, Path(tmp_path_factory.mktemp("ranks")), 300)[0]


def alone(prompt: tuple[int, ...], params: SamplingParams) -> list[int]:
    source = SyntheticWeights.for_shape(SHAPE, seed=11)
    return Generator.from_source(source, 64).generate([Request("r", prompt, params)])["r"].token_ids


def test_sampled_requests_equal_the_world_1_generator(leader: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    assert leader["sampled"] == [alone(p, s) for p, s in SAMPLED]


def test_a_stop_token_ends_the_request(leader: dict[str, Any]) -> None:
    first, stopped, finish = leader["stop"]
    assert finish == "stop" and stopped == first[: first.index(first[2]) + 1]


def test_a_request_failed_by_a_rank_ends_alone_and_the_group_keeps_serving(
    leader: dict[str, Any],
) -> None:
    (bad, bad_finish, bad_error), *good = leader["failing"]
    assert (bad, bad_finish) == ([], "error") and "injected bug" in bad_error
    assert [(len(t), f) for t, f, _ in good] == [(6, "length"), (6, "length")]
    assert leader["after_failure"] == good[0][0]


def test_the_queue_is_bounded_and_impossible_requests_are_refused(leader: dict[str, Any]) -> None:
    status, message = leader["queue_full"]
    assert status == 429 and "max_queued_requests" in message
    assert leader["too_long"] == [400, "max_tokens"]
    (aborted_tokens, aborted), (hog_tokens, finished) = leader["hogs"]
    assert aborted == "abort" and aborted_tokens < 30
    assert (hog_tokens, finished) == (30, "length")
    assert leader["waiting"] == ["length"] * 3


def test_stale_plans_liveness_and_metrics(leader: dict[str, Any]) -> None:
    assert leader["stale"] == {"applied": False, "reason": "stale", "version": 1}
    assert leader["live"] is True
    text = leader["metrics"]
    assert 'moe_requests_finished_total{rank="0",reason="error"} 1.0' in text
    assert 'moe_requests_finished_total{rank="0",reason="abort"} 1.0' in text
    assert 'moe_requests_waiting{rank="0"} 0.0' in text


def test_a_rank_that_stops_stepping_is_not_live() -> None:
    source = SyntheticWeights.for_shape(SHAPE, seed=11)
    runtime = Runtime(SETTINGS.replace(stall_timeout=5.0), source)
    backend = runtime.backend
    assert backend.is_live()  # not serving yet: forming the group is not a stall
    with pytest.raises(NotReady):
        backend.submit(GenerationRequest("a", (1,)), lambda e: None)
    runtime.state.serving = True
    runtime.state.last_step = time.monotonic() - 6.0
    assert not backend.is_live()
    runtime.state.stepped()
    assert backend.is_live()


def test_non_leaders_refuse_generation() -> None:
    source = SyntheticWeights.for_shape(SHAPE, seed=11)
    backend = Runtime(SETTINGS.replace(rank=1, world_size=2), source).backend
    with pytest.raises(NotReady, match="leader"):
        backend.submit(GenerationRequest("a", (1,)), lambda e: None)
    answer = backend.switch_plan(round_robin_plan(2, 4, 2, 2, version=5), 1.0)
    assert not answer.applied and answer.reason == "not ready"
