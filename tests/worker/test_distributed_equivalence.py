"""EP on 4 gloo ranks and the TP2 x PP2 baseline give the single-process reference's logits: the
grouped path, routing by pod, plan switches (blocking and in the background), two-batch
overlap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from worker_dist_cases import all_cases
from worker_harness import run_world

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5  # fp32; only the grouping of rows in matmuls and sum order differ


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_world(all_cases, 4, Path(tmp_path_factory.mktemp("ranks")))


def test_each_rank_loads_only_the_experts_its_plan_gives_it(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        assert r["loaded"] == [[0, rank], [1, rank]]


def test_ep_round_robin_matches_reference(results: list[dict[str, Any]]) -> None:
    assert all(r["round_robin"] < TOLERANCE for r in results)


def test_ep_replicated_experts_match_reference(results: list[dict[str, Any]]) -> None:
    assert all(r["replicated"] < TOLERANCE for r in results)


def test_replicas_share_the_load_of_a_replicated_expert(results: list[dict[str, Any]]) -> None:
    # Expert 0 of layer 0 has replicas on ranks 0, 1 and 2: each processed some of its tokens.
    assert all(r["replicated_local_counts"][0][0] > 0 for r in results[:3])
    assert results[3]["replicated_local_counts"][0][0] == 0


def test_routing_by_pod_keeps_outputs_and_counts(results: list[dict[str, Any]]) -> None:
    assert all(r["pods"] < TOLERANCE for r in results)
    assert all(r["pods_counts"] == r["reference_counts"] for r in results)
    # expert 0 of layer 0 sits on ranks 0, 1 (pod 0) and 2 (pod 1): routing by pod moves some of
    # its tokens between replicas, never to a rank without it
    local = [r["pods_local_counts"][0][0] for r in results]
    assert local[3] == 0 and sum(local) == sum(r["replicated_local_counts"][0][0] for r in results)
    assert local != [r["replicated_local_counts"][0][0] for r in results]


def test_ep_matches_reference_across_plan_switches(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert len(r["switch"]) == 4
        assert max(r["switch"]) < TOLERANCE
    # Back on round-robin, every rank holds its own expert again, received point to point.
    assert [r["switch_held"] for r in results] == [[[rank], [rank]] for rank in range(4)]
    assert sum(sum(r["switch_received"]) for r in results) > 0


def test_two_batch_overlap_and_a_background_switch_match_reference(
    results: list[dict[str, Any]],
) -> None:
    for r in results:
        assert r["two_batch"] < TOLERANCE
        assert len(r["background"]) >= 2 and max(r["background"]) < TOLERANCE
    assert [r["background_held"][0] for r in results] == [[0, 1], [0, 2], [0, 3], [1, 2]]


def test_expert_counts_equal_routed_tokens(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["round_robin_counts"] == r["reference_counts"]
        assert r["replicated_counts"] == r["reference_counts"]


def test_tp2_pp2_baseline_matches_reference(results: list[dict[str, Any]]) -> None:
    last_stage = [r["tppp"] for r in results[2:]]
    assert all(err is not None and err < TOLERANCE for err in last_stage)
    assert [r["tppp"] for r in results[:2]] == [None, None]
