"""The timer's control loop against kmock: load reading, the hand-off to the leader, failures.

The operator runs for real; kmock is the API server, and one kmock HTTP mock per rank stands in
for the workers at the pods' IPs (127.0.0.1 for rank 0, 127.0.0.2 for rank 1; see `Workers`).
Experts 0 and 2 are hot and the round-robin plan puts both on rank 0, so the first full window
(1 s, after one to open it) asks for a new plan; the plan that splits them balances the ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
from moe_kmock import CM, MOED, NS, STS, Api, Operator, Workers, eventually, small_spec, timer_ran

from moe_contract.plan import parse_plan, validate_plan


async def deploy(api: Api, workers: Workers, name: str = "m1", **spec: Any) -> None:
    """A deployment whose pods run and are ready, with the workers holding its token."""
    await api.create_moed(name, small_spec(port=workers.port, **spec))
    await eventually(lambda: api.token(name) and api.get(STS, NS, name), what="children")
    workers.token = api.token(name)  # what the pods mount from the Secret
    workers.durable = lambda: (api.plan(name) or {}).get("version")
    await api.run_pods(name, workers.world)


def configmap_versions(api: Api, name: str = "m1") -> list[int]:
    history, key = api.history(CM, NS, f"{name}-plan"), api.plan_key(name)
    return [parse_plan(version["data"][key]).version for version in history]


def plan_status(api: Api, name: str = "m1") -> dict[str, Any]:
    return api.status(name).get("plan") or {}


async def evaluations(workers: Workers, count: int) -> None:
    """Wait until the operator has scraped rank 1 `count` more times (one read per window)."""
    scrapes = len(workers.handlers[1])
    await eventually(
        lambda: len(workers.handlers[1]) >= scrapes + count, what=f"{count} more scrapes"
    )


async def test_timer_rebalances_and_hands_the_plan_to_the_leader(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await api.create_moed("m1", small_spec(port=workers.port))
    await eventually(lambda: api.token("m1") and api.get(STS, NS, "m1"), what="children")
    await timer_ran()
    assert len(workers.handlers[0]) == len(workers.handlers[1]) == 0  # not ready: nobody asked
    workers.token = api.token("m1")
    workers.durable = lambda: (api.plan("m1") or {}).get("version")
    await api.run_pods("m1", workers.world)

    await eventually(lambda: workers.applied == [2], what="plan 2 applied")
    post = workers.posts[-1]
    assert post["authorization"] == f"Bearer {api.token('m1')}"
    assert post["configmap_version"] == 2  # durable first: written before it was sent
    assert post["body"] == api.plan("m1")  # the very document in the ConfigMap
    plan = parse_plan(api.plan("m1"))
    validate_plan(plan, num_layers=2, num_experts=4, world_size=2)
    for layer in plan.slots:  # one hot expert per rank now
        assert sorted(expert in (0, 2) for expert in layer[0]) == [False, True]

    await eventually(lambda: plan_status(api).get("appliedVersion") == 2, what="status applied")
    status = api.status("m1")
    assert status["plan"]["version"] == 2
    assert status["phase"] == "Running"
    record = status["lastRebalance"]
    assert record["fromVersion"] == 1 and record["toVersion"] == 2
    assert record["method"] == "Replace"
    assert record["imbalanceBefore"] == pytest.approx(200 / 110, abs=0.01)
    assert record["imbalanceAfter"] == pytest.approx(1.0, abs=0.01)
    assert record["slotsMoved"] > 0
    await eventually(
        lambda: "Rebalanced" in {event["reason"] for event in api.events(NS, "m1")},
        what="Rebalanced event",
    )
    rebalanced = [event for event in api.events(NS, "m1") if event["reason"] == "Rebalanced"]
    assert len(rebalanced) == 1 and "plan 2" in rebalanced[0]["message"]

    # Balanced now: later windows measure that and issue nothing more.
    await eventually(
        lambda: api.condition("m1", "Balanced").get("status") == "True", what="Balanced"
    )
    assert api.condition("m1", "LoadsRead")["status"] == "True"  # measured, and held
    assert workers.applied == [2]
    assert configmap_versions(api) == [1, 2]


async def test_leader_failures_never_lose_the_plan_nor_apply_it_twice(
    api: Api, workers: Workers, operator: Operator
) -> None:
    workers.post_status = 500
    await deploy(api, workers)

    await eventually(lambda: plan_status(api).get("version") == 2, what="plan 2")
    await eventually(lambda: len(workers.posts) >= 2, what="POST retried")
    assert workers.applied == []
    status = api.status("m1")
    assert status["plan"]["appliedVersion"] == 1
    assert status["phase"] == "Rebalancing"
    assert api.condition("m1", "Progressing")["reason"] == "ApplyingPlan"

    # The leader is gone altogether: connection refused (its /metrics too).
    await workers.stop(0)
    await eventually(
        lambda: api.condition("m1", "LoadsRead").get("status") == "False", what="LoadsRead False"
    )
    assert "127.0.0.1" in api.condition("m1", "LoadsRead")["message"]
    await evaluations(workers, 1)
    assert configmap_versions(api) == [1, 2]
    assert plan_status(api) | {"method": None} == {
        "version": 2,
        "appliedVersion": 1,
        "digest": parse_plan(api.plan("m1")).digest(),
        "configMap": "m1-plan",
        "configMapKey": "plan-L2-E4-R2-S2.json",
        "method": None,
    }
    assert api.status("m1")["phase"] == "Rebalancing"

    # It heals: the same plan 2 is sent again and applied once; no plan 3 for the same decision.
    workers.post_status = None
    await workers.start(0)
    await eventually(lambda: workers.applied == [2], what="plan 2 applied")
    await eventually(lambda: plan_status(api).get("appliedVersion") == 2, what="status applied")
    await evaluations(workers, 1)
    assert workers.applied == [2]
    assert {post["body"]["version"] for post in workers.posts} == {2}
    assert configmap_versions(api) == [1, 2]
    assert api.status("m1")["phase"] == "Running"


async def test_restart_mid_handoff_converges_to_the_durable_plan(
    api: Api, workers: Workers, operator: Operator
) -> None:
    """GatingBias: a planner that always finds a next step, so a second plan would show."""
    workers.post_status = 500
    # No leak: once the bias balances the load (the fake workers' counters even out under
    # any bias) it stays as it is, so every plan after 2 would be a resend bug, not upkeep.
    gating = {"damping": 0.0}
    await deploy(api, workers, rebalancing={"method": "GatingBias", "gating": gating})
    await eventually(lambda: plan_status(api).get("version") == 2, what="plan 2")
    assert api.plan("m1")["gateBias"]
    assert rebalanced_events(api) == []  # issued, not served: no news yet
    await operator.stop()
    # The operator died after writing plan 2 to the ConfigMap and before its status patch
    # landed (the POST to a hung leader can take up to its 90 s timeout in between).
    await api.patch(
        MOED,
        NS,
        "m1",
        {
            "status": {
                "plan": {"version": 1, "appliedVersion": 1},
                "detection": {
                    "aboveCount": 0,
                    "desiredVersion": 1,
                    "appliedVersion": 1,
                    "lastRebalanceAt": None,
                },
                "lastRebalance": None,
            }
        },
        sub="status",
    )
    await operator.start()
    await eventually(lambda: plan_status(api).get("version") == 2, what="status from ConfigMap")
    # What the lost status patch carried comes back from the ConfigMap too (issue 11, item 8):
    # the last rebalance, and the time it was issued, which the cooldown counts from.
    status = api.status("m1")
    assert (status.get("lastRebalance") or {}).get("toVersion") == 2, status
    assert (status.get("detection") or {}).get("lastRebalanceAt"), status
    await evaluations(workers, 3)  # a window to open and two to evaluate, leader still failing
    assert configmap_versions(api) == [1, 2], "a new plan while plan 2 was still in flight"
    assert workers.applied == []

    workers.post_status = None
    await eventually(lambda: workers.applied == [2], what="plan 2 applied after the restart")
    await eventually(lambda: plan_status(api).get("appliedVersion") == 2, what="status applied")
    await evaluations(workers, 1)
    assert workers.applied == [2]
    # Issue 19, item 10: the Rebalanced Event comes when plan 2 is first seen served, from the
    # record the restarted operator restored (posted at issuance, it came before the restart
    # or, had the operator died right after writing the plan, never).
    (event,) = rebalanced_events(api)
    assert event["message"].startswith("plan 2: imbalance ") and "(GatingBias)" in event["message"]
    assert configmap_versions(api) == [1, 2]
    assert {post["body"]["version"] for post in workers.posts} == {2}
    desired = [
        version["status"]["plan"]["version"]
        for version in api.history(MOED, NS, "m1")
        if (version.get("status") or {}).get("plan")
    ]
    after_restart = desired[len(desired) - desired[::-1].index(1) :]  # after our rollback
    assert after_restart and set(after_restart) == {2}


def rebalanced_events(api: Api, name: str = "m1") -> list[dict[str, Any]]:
    return [event for event in api.events(NS, name) if event["reason"] == "Rebalanced"]


def loads_read(moed: dict[str, Any]) -> tuple[str, str]:
    for condition in (moed.get("status") or {}).get("conditions") or []:
        if condition["type"] == "LoadsRead":
            return condition["status"], condition["message"]
    return "absent", ""


async def test_bad_load_data_never_rebalances(
    api: Api, workers: Workers, operator: Operator
) -> None:
    faults = [
        ("malformed metrics text", "metrics_override", b"moe_expert_tokens_total{{{ 1"),
        (
            "label expert='99'",
            "metrics_override",
            b'moe_expert_tokens_total{layer="0",expert="99"} 5\n',
        ),
        ("counter went down", "restarting", 1),
    ]
    await deploy(api, workers)
    for reason, attribute, value in faults:
        setattr(workers, attribute, value)
        await eventually(
            lambda reason=reason: reason in api.condition("m1", "LoadsRead").get("message", ""),
            what=f"LoadsRead: {reason}",
        )
        since = len(api.history(MOED, NS, "m1"))
        await evaluations(workers, 1)
        # The condition stays while the cause lasts, also on the timer runs between two reads.
        shown = [loads_read(version) for version in api.history(MOED, NS, "m1")[since - 1 :]]
        assert {(status, reason in message) for status, message in shown} == {("False", True)}
        assert configmap_versions(api) == [1]
        assert workers.posts == []
        assert api.status("m1")["phase"] == "Running"
        setattr(workers, attribute, None)
    assert operator.running

    # The same deployment with good data does rebalance: the skips above were the data's doing.
    await eventually(lambda: workers.applied == [2], what="plan 2 from good data")
    await eventually(
        lambda: api.condition("m1", "LoadsRead").get("status") == "True", what="LoadsRead True"
    )
