"""Four real `moe-worker serve` processes (gloo): the plan endpoint, metrics, and serving that goes
on across plan switches (the built-in traffic keeps the group busy with generated requests)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_harness import FIXTURES, Cluster, parse_metric

from moe_contract.plan import parse_plan

pytestmark = pytest.mark.distributed

ENV = {
    "MOE_LAYERS": "2",
    "MOE_EXPERTS_PER_LAYER": "4",
    "MOE_HIDDEN_SIZE": "32",
    "MOE_FFN_HIDDEN_SIZE": "64",
    "MOE_ATTENTION_HEADS": "4",
    "MOE_HEAD_DIM": "8",
    "MOE_TOP_K": "2",
    "MOE_VOCAB_SIZE": "64",
    "MOE_SEED": "7",
    "MOE_KV_CACHE_TOKENS": "256",
    "MOE_TRAFFIC_BATCH": "1",
    "MOE_TRAFFIC_SEQ_LEN": "4",
    "MOE_TRAFFIC_INTERVAL": "0.1",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("cluster")), 4, ENV)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def document(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def version(cluster: Cluster, rank: int = 0) -> int:
    status, plan = cluster.request(rank, "/v1/plan", token=cluster.token)
    assert status == 200
    return int(plan["version"])


def pids(cluster: Cluster) -> list[int]:
    return [cluster.request(rank, "/healthz")[1]["pid"] for rank in range(cluster.world)]


def expert_series(cluster: Cluster, rank: int) -> dict[tuple[int, int], float]:
    samples = parse_metric(cluster.request(rank, "/metrics")[1], "moe_expert_tokens_total")
    return {(int(dict(k)["layer"]), int(dict(k)["expert"])): v for k, v in samples.items()}


def routed_tokens(cluster: Cluster) -> float:
    """Every rank's tokens over all layers (moe_layer_tokens_total: monotonic across switches)."""
    return sum(
        sum(parse_metric(cluster.request(rank, "/metrics")[1], "moe_layer_tokens_total").values())
        for rank in range(cluster.world)
    )


def check_serving(cluster: Cluster) -> None:
    """The group still runs steps: the experts' token counters grow."""
    before = routed_tokens(cluster)
    deadline = time.monotonic() + 60
    while routed_tokens(cluster) <= before:
        assert time.monotonic() < deadline, "no token was routed for 60 s"
        time.sleep(0.3)


def post_plan(cluster: Cluster, doc: dict[str, Any], token: str | None = "") -> tuple[int, Any]:
    return cluster.request(0, "/v1/plan", doc, token=cluster.token if token == "" else token)


def test_starts_on_round_robin_and_counts_only_held_experts(cluster: Cluster) -> None:
    expected = parse_plan(document("round-robin-2layer-4expert-4rank.json"))
    for rank in range(cluster.world):
        assert (
            parse_plan(cluster.request(rank, "/v1/plan", token=cluster.token)[1]).slots
            == expected.slots
        )
        assert cluster.request(rank, "/readyz")[0] == 200
    check_serving(cluster)
    for rank in range(cluster.world):  # rank r holds expert r of both layers
        assert set(expert_series(cluster, rank)) == {(0, rank), (1, rank)}


def test_valid_plans_apply_on_every_rank_without_restart(cluster: Cluster) -> None:
    started = pids(cluster)
    series_before = [expert_series(cluster, rank) for rank in range(cluster.world)]
    for name in (
        "replicated-2layer-4expert-4rank-2slots.json",
        "gate-bias-2layer-4expert-4rank.json",
    ):
        new_version = version(cluster) + 1
        doc = {**document(name), "version": new_version}
        status, body = post_plan(cluster, doc)
        assert status == 200, body
        assert body["applied"] is True and body["version"] == new_version
        assert body["pauseSeconds"] >= 0
        assert body["digest"] == parse_plan(doc).digest()
        for rank in range(cluster.world):
            answer = cluster.request(rank, "/v1/plan", token=cluster.token)[1]
            served = parse_plan(answer)  # checks the digest it carries against the contents
            assert served == parse_plan(doc) and answer["digest"] == served.digest()
            metrics = cluster.request(rank, "/metrics")[1]
            assert parse_metric(metrics, "moe_plan_version")[(("rank", str(rank)),)] == new_version
        check_serving(cluster)
    assert pids(cluster) == started
    assert all(proc.poll() is None for proc in cluster.procs)
    metrics = cluster.request(1, "/metrics")[1]
    assert parse_metric(metrics, "moe_plan_switch_pause_seconds_count")[(("rank", "1"),)] >= 2
    moved = sum(
        parse_metric(cluster.request(r, "/metrics")[1], "moe_experts_moved_total")[
            (("rank", str(r)),)
        ]
        for r in range(cluster.world)
    )
    assert moved > 0
    # A rank exports the experts it holds now, and only those; no counter goes back.
    plan = parse_plan(cluster.request(0, "/v1/plan", token=cluster.token)[1])
    for rank, before in enumerate(series_before):
        after = expert_series(cluster, rank)
        assert all(after[key] >= value for key, value in before.items() if key in after)
        held = {(layer, e) for layer, slots in enumerate(plan.slots) for e in slots[rank]}
        assert held == set(after)


@pytest.mark.parametrize(
    ("name", "status", "field"),
    [
        ("invalid-wrong-layer-count.json", 422, "slots"),
        ("invalid-wrong-world-size.json", 422, "slots[0]"),
        ("invalid-unknown-expert.json", 422, "slots[0][3][0]"),
        ("invalid-missing-expert.json", 422, "slots[0]"),
        ("invalid-slot-count-mismatch.json", 422, "slots[0][3]"),
        ("invalid-gate-bias-length.json", 422, "gateBias[0]"),
        ("invalid-missing-version.json", 400, "version"),
        ("invalid-unknown-field.json", 400, "placement"),
        ("invalid-digest.json", 400, "digest"),
    ],
)
def test_invalid_plans_are_refused_and_the_old_plan_keeps_serving(
    cluster: Cluster, name: str, status: int, field: str
) -> None:
    before = cluster.request(0, "/v1/plan", token=cluster.token)[1]
    got, body = post_plan(cluster, document(name))
    assert got == status, body
    assert body["field"] == field, body
    assert all(
        cluster.request(r, "/v1/plan", token=cluster.token)[1] == before
        for r in range(cluster.world)
    )


def test_unparsable_body_is_a_400(cluster: Cluster) -> None:
    status, body = cluster.request(0, "/v1/plan", raw=b"{not json", token=cluster.token)
    assert status == 400 and "error" in body
    check_serving(cluster)


def test_stale_versions_are_ignored(cluster: Cluster) -> None:
    current = cluster.request(0, "/v1/plan", token=cluster.token)[1]
    for stale in (current["version"], 1):
        doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": stale}
        status, body = post_plan(cluster, doc)
        assert status == 409, body
        assert body == {"applied": False, "reason": "stale", "version": current["version"]}
    assert cluster.request(3, "/v1/plan", token=cluster.token)[1] == current


@pytest.mark.parametrize("token", [None, "wrong-token", "s3cret-token-but-longer"])
def test_missing_or_wrong_token_is_a_401(cluster: Cluster, token: str | None) -> None:
    before = cluster.request(0, "/v1/plan", token=cluster.token)[1]
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": before["version"] + 1}
    status, body = post_plan(cluster, doc, token=token)
    assert status == 401, body
    assert cluster.request(0, "/v1/plan", token=cluster.token)[1] == before
    assert cluster.token not in json.dumps(body)


def test_non_leader_points_to_rank_0(cluster: Cluster) -> None:
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 99}
    status, body = cluster.request(2, "/v1/plan", doc, token=cluster.token)
    assert status == 421 and body["leaderRank"] == 0
    assert version(cluster, 2) < 99


def test_every_rank_is_live_and_the_token_never_in_logs(cluster: Cluster) -> None:
    for rank in range(cluster.world):
        assert cluster.request(rank, "/healthz")[0] == 200
    assert all(cluster.token not in cluster.logs(rank) for rank in range(cluster.world))
