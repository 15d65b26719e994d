"""Ranks per pod (issue 12, item 2) and gang recovery (item 5), the pure parts: the pod
builder's rank arithmetic, its validation, per-rank counters of a pod, a failed rank seen in
the pods' status."""

from __future__ import annotations

from typing import Any

import pytest

from moe_contract import env as worker_env
from moe_operator.api import MoEDeploymentSpec
from moe_operator.group import RECOVERING_REASON, PodRef, gang_failure
from moe_operator.loads import parse_exposition
from moe_operator.manifests import children
from moe_operator.status import Observed, compute_status
from moe_operator.validation import cross_field_problems
from moe_worker.settings import settings_from_env

NOW = "2026-01-01T00:00:00Z"


def spec(expert: int, **worker: Any) -> MoEDeploymentSpec:
    slots = -(-MoEDeploymentSpec().model.experts_per_layer // expert)  # every expert placed
    return MoEDeploymentSpec.model_validate(
        {"parallelism": {"expert": expert}, "placement": {"slotsPerRank": slots}, "worker": worker}
    )


def pod_env(statefulset: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The variables the pod named `pod_name` of this StatefulSet gets (the downward API's
    metadata.name filled in as the kubelet does)."""
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    found = {item["name"]: item.get("value", "") for item in container["env"]}
    return {**found, worker_env.POD_NAME: pod_name}


@pytest.mark.parametrize(
    ("expert", "worker", "pods", "per_pod"),
    [
        (16, {"gpusPerPod": 8}, 2, 8),  # the seed's EP16 on two 8-GPU nodes
        (16, {"gpusPerPod": 1}, 16, 1),
        (8, {"gpusPerPod": 4}, 2, 4),
        (12, {"gpusPerPod": 4, "ranksPerPod": 3}, 4, 3),  # a GPU left for something else
        (4, {"device": "cpu", "backend": "gloo", "gpusPerPod": 0}, 4, 1),  # cpu: 1 by default
        (4, {"device": "cpu", "backend": "gloo", "gpusPerPod": 0, "ranksPerPod": 2}, 2, 2),
        (6, {"device": "cpu", "backend": "gloo", "gpusPerPod": 0, "ranksPerPod": 6}, 1, 6),
    ],
)
def test_pods_split_the_world_into_consecutive_ranks(
    expert: int, worker: dict[str, Any], pods: int, per_pod: int
) -> None:
    """replicas = world / ranks per pod; pod p runs ranks p x per_pod .. + per_pod - 1 (GPU r
    of the pod is local rank r), every rank exactly once, as the worker reads its environment."""
    parsed = spec(expert, **worker)
    assert cross_field_problems(parsed) == []
    statefulset = children.build_statefulset("m", "ns", parsed)
    assert statefulset["spec"]["replicas"] == parsed.pods == pods
    seen: list[int] = []
    for ordinal in range(pods):
        settings = settings_from_env(pod_env(statefulset, f"m-{ordinal}"))
        assert (settings.ranks_per_pod, settings.world_size) == (per_pod, expert)
        assert settings.rank == ordinal * per_pod
        seen += worker_env.pod_ranks(ordinal, per_pod)
    assert seen == list(range(expert))
    assert worker_env.pod_of_rank(expert - 1, per_pod) == pods - 1
    resources = statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]
    gpus = parsed.worker.gpus_per_pod if parsed.worker.device == "cuda" else 0
    assert resources.get("limits", {}).get(children.GPU_RESOURCE, "0") == str(gpus)


@pytest.mark.parametrize(
    ("expert", "worker", "field", "words"),
    [
        (12, {"gpusPerPod": 8}, "worker.ranksPerPod", "not a multiple of 8"),
        (6, {"device": "cpu", "backend": "gloo", "ranksPerPod": 4}, "worker.ranksPerPod", "4"),
        (8, {"gpusPerPod": 2, "ranksPerPod": 4}, "worker.ranksPerPod", "need a GPU each"),
        (8, {"gpusPerPod": 8, "port": 8000, "apiPort": 8003}, "worker.port", "8003"),
    ],
)
def test_a_layout_that_does_not_fit_names_the_field_and_the_fix(
    expert: int, worker: dict[str, Any], field: str, words: str
) -> None:
    problems = [p for p in cross_field_problems(spec(expert, **worker)) if p.field == field]
    assert problems and words in problems[0].message, cross_field_problems(spec(expert, **worker))


def test_the_pod_carries_the_timeouts_and_a_liveness_probe_on_the_watchdog() -> None:
    parsed = spec(16, gpusPerPod=8, stallTimeoutSeconds=30, collectiveTimeoutSeconds=90)
    statefulset = children.build_statefulset("m", "ns", parsed)
    settings = settings_from_env(pod_env(statefulset, "m-1"))
    assert (settings.stall_timeout, settings.collective_timeout) == (30.0, 90.0)
    assert settings_from_env(pod_env(children.build_statefulset("m", "ns", spec(16)), "m-0")) \
        .collective_timeout == 120.0  # fmt: skip
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    probe = container["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert probe["timeoutSeconds"] > 2  # the pod asks each rank, up to 2 s
    one = children.build_statefulset("m", "ns", spec(16, gpusPerPod=1))
    assert one["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["timeoutSeconds"] == 1
    # A pod that stops answering is restarted after about half the stall timeout, at least 3
    # failures: a short pause that heals is not punished.
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget == 15
    for stall, expected in ((5, 15), (60, 30), (600, 300)):
        probe = children.liveness_probe(stall)
        assert probe["periodSeconds"] * probe["failureThreshold"] == expected


def test_a_pods_metrics_are_split_by_the_rank_label() -> None:
    text = (
        "# TYPE moe_expert_tokens_total counter\n"
        'moe_expert_tokens_total{rank="2",layer="0",expert="1"} 5\n'
        'moe_expert_tokens_total{rank="3",layer="0",expert="1"} 7\n'
        'moe_expert_tokens_total{rank="3",layer="1",expert="0"} 1\n'
        "# TYPE moe_plan_version gauge\n"
        'moe_plan_version{rank="2"} 4\n'
        'moe_plan_version{rank="3"} 5\n'
    )
    common = {"num_layers": 2, "num_experts": 2, "where": "pod 1"}
    assert parse_exposition(text, rank=2, **common) == ({(0, 1): 5.0}, 4)
    assert parse_exposition(text, rank=3, **common) == ({(0, 1): 7.0, (1, 0): 1.0}, 5)


def pod(ordinal: int, container: dict[str, Any] | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"m-{ordinal}", "uid": f"u{ordinal}"}
    if deleting:
        meta["deletionTimestamp"] = NOW
    statuses = [] if container is None else [{"name": "worker", **container}]
    return {"metadata": meta, "status": {"containerStatuses": statuses}}


RUNNING = {"restartCount": 0, "state": {"running": {}}}


def test_a_group_that_runs_as_started_has_no_failure() -> None:
    assert gang_failure([pod(0, RUNNING), pod(1, RUNNING), pod(2, None)]) is None


def test_one_restarted_pod_brings_back_every_pod_of_the_group() -> None:
    """The launcher's termination message names the rank; the pods go together, uid-checked."""
    killed = {
        "restartCount": 1,
        "state": {"running": {}},
        "lastState": {"terminated": {"exitCode": 1, "message": "rank 3 was killed by SIGKILL"}},
    }
    failure = gang_failure([pod(0, RUNNING), pod(1, killed), pod(2, RUNNING, deleting=True)])
    assert failure is not None
    assert failure.pods == (PodRef("m-0", "u0"), PodRef("m-1", "u1"))
    assert failure.failed == ("m-1 exited with code 1, restarted 1x: rank 3 was killed by SIGKILL",)
    assert "m-1" in failure.message(2) and "rank 3" in failure.message(2)


def test_a_worker_that_exited_counts_before_its_restart_but_a_refusal_never() -> None:
    exited = {"restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    failure = gang_failure([pod(0, exited), pod(1, RUNNING)])
    assert failure is not None and failure.failed == ("m-0 exited with code 137 (OOMKilled)",)
    refused = {"restartCount": 3, "lastState": {"terminated": {"exitCode": 2}}, "state": {}}
    assert gang_failure([pod(0, refused), pod(1, RUNNING)]) is None


def test_status_says_degraded_naming_the_failure_while_the_group_comes_back() -> None:
    failure = "m-1 exited with code 1: rank 3 was killed by SIGKILL"
    observed = Observed(
        generation=1, workers=2, statefulset_exists=True, ready_workers=1, recovering=failure
    )
    status = compute_status(observed, [], NOW)
    assert status["phase"] == "Degraded"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", RECOVERING_REASON)
    assert "rank 3" in degraded["message"]
