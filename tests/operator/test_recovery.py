"""The group decision of one run: replace an outdated or failed group, back off, or report."""

from __future__ import annotations

from typing import Any

from moe_operator.failures import STARTUP_EXIT_CODE
from moe_operator.group import RECOVERING_REASON, REVISION_LABEL, PodRef, ReplacementBackoff
from moe_operator.recovery import GroupView, decide

NOW = 1_000_000.0
WORLD = 2


def sts(generation: int = 2, observed: int = 2) -> dict[str, Any]:
    status = {"observedGeneration": observed, "updateRevision": "r2", "readyReplicas": WORLD}
    return {"metadata": {"generation": generation}, "status": status}


def pod(rank: int, revision: str = "r2", worker: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"name": f"m-{rank}", "uid": f"u{rank}", "labels": {REVISION_LABEL: revision}}
    status = {"name": "worker", "state": {"running": {}}, "restartCount": 0, **(worker or {})}
    return {"metadata": meta, "status": {"containerStatuses": [status]}}


def died(rank: int) -> dict[str, Any]:
    return pod(rank, worker={"restartCount": 1, "lastState": {"terminated": {"exitCode": 1}}})


def refused(rank: int) -> dict[str, Any]:
    terminated = {"exitCode": STARTUP_EXIT_CODE, "message": f"rank {rank}: no config.json"}
    return pod(rank, worker={"state": {"terminated": terminated}})


def view(
    pods: list[dict[str, Any]],
    previous: dict[str, Any] | None = None,
    ready: int = WORLD,
    statefulset: dict[str, Any] | None = None,
) -> GroupView:
    return GroupView(statefulset or sts(), pods, WORLD, ready, previous or {})


def degraded(message: str) -> dict[str, Any]:
    condition = {"type": "Degraded", "status": "True", "reason": RECOVERING_REASON}
    return {"conditions": [{**condition, "message": message}]}


def test_a_settled_group_is_left_alone() -> None:
    action = decide(view([pod(0), pod(1)]), NOW)
    assert action.delete == () and action.events == () and action.deletion is None
    assert (action.recovering, action.restarting, action.failure) == (None, False, None)
    assert action.after_deleting(0) == (action.group, ())


def test_an_outdated_template_replaces_its_pods_together() -> None:
    action = decide(view([pod(0, "r1"), pod(1, "r1")]), NOW)
    assert action.delete == (PodRef("m-0", "u0"), PodRef("m-1", "u1"))
    assert action.restarting and action.recovering is None and not action.replacing
    group, events = action.after_deleting(2)
    assert group == action.group  # they were counted as outdated already
    ((kind, reason, message),) = events
    assert (kind, reason) == ("Normal", "GroupRestart")
    assert message.startswith("deleted 2 pods together: replacing all 2 pods")


def test_nothing_is_decided_before_the_controller_saw_the_template() -> None:
    action = decide(view([died(0), pod(1)], statefulset=sts(generation=3)), NOW)
    assert action.delete == () and action.restarting and action.recovering is None


def test_a_dead_rank_replaces_the_whole_group_and_starts_the_backoff() -> None:
    action = decide(view([died(0), pod(1)]), NOW)
    assert action.delete == (PodRef("m-0", "u0"), PodRef("m-1", "u1")) and action.replacing
    assert action.recovering is not None and "m-0 exited with code 1" in action.recovering
    assert action.backoff == ReplacementBackoff(1, NOW) and not action.restarting
    group, events = action.after_deleting(1)  # one was gone already
    assert group.terminating == 1 and not group.settled
    ((kind, reason, message),) = events
    assert (kind, reason) == ("Warning", RECOVERING_REASON)
    assert message == f"deleted 1 pods: {action.recovering}"


def test_a_replacement_in_a_row_is_held_and_said_once() -> None:
    previous = {"recovery": {"replacements": 2, "lastReplacedAt": NOW - 5}}
    action = decide(view([died(0), pod(1)], previous), NOW)
    assert action.delete == () and action.backoff == ReplacementBackoff(2, NOW - 5)
    assert action.recovering is not None and "replaced 2 times in a row" in action.recovering
    ((_, reason, message),) = action.events
    assert reason == "GroupBackoff" and message == action.recovering
    said = {**previous, **degraded(action.recovering)}
    assert decide(view([died(0), pod(1)], said), NOW).events == ()  # news once
    later = decide(view([died(0), pod(1)], said), NOW + 60)
    assert later.delete and later.backoff == ReplacementBackoff(3, NOW + 60)


def test_the_recovery_stands_until_the_whole_group_is_back_and_ready() -> None:
    said = "m-0 exited: replacing all 2 pods at once"
    previous = degraded(said)
    assert decide(view([pod(0)], previous, ready=1), NOW).recovering == said  # one missing
    assert decide(view([pod(0), pod(1)], previous, ready=1), NOW).recovering == said
    assert decide(view([pod(0), pod(1)], previous), NOW).recovering is None


def test_a_refusal_to_start_is_reported_once_instead_of_a_recovery() -> None:
    previous = degraded("m-0 exited: replacing all 2 pods at once")
    action = decide(view([refused(0), pod(1)], previous, ready=1), NOW)
    assert action.failure is not None and action.recovering is None and action.delete == ()
    ((kind, reason, message),) = action.events
    assert (kind, reason) == ("Warning", "WorkerStartupFailed") and "no config.json" in message
    said = {"conditions": [{"type": "Ready", "message": f"1/2 ready; {action.failure.message}"}]}
    assert decide(view([refused(0), pod(1)], said, ready=1), NOW).events == ()


def test_a_refusal_beside_a_dead_rank_replaces_nothing_and_holds_the_group() -> None:
    """The crash loop of issue 19 (item 3): a rank that died because its peer refused used to
    have the whole group replaced, again and again; now the refusal holds the group instead."""
    assert decide(view([died(0), pod(1)]), NOW).delete != ()  # alone, a death replaces
    action = decide(view([refused(0), died(1)], ready=0), NOW)
    assert action.hold and action.delete == () and not action.replacing
    assert action.failure is not None and action.failure.pods == ("m-0",)
    assert action.backoff == ReplacementBackoff()  # no replacement counted


def test_a_held_refusal_stands_for_its_generation_only() -> None:
    refusal = decide(view([refused(0), pod(1)], ready=1), NOW).failure
    assert refusal is not None
    previous = {"refusal": refusal.record(7)}
    running_again = [pod(0, worker={"restartCount": 1}), pod(1)]  # the kubelet restarted it
    held = decide(GroupView(sts(), running_again, WORLD, 0, previous, 7), NOW)
    assert held.hold and held.failure == refusal and held.events == () and held.delete == ()
    for pods in ([], [pod(0, "r1"), pod(1, "r1")]):  # scaled to 0, or an old template
        assert decide(GroupView(sts(), pods, WORLD, 0, previous, 7), NOW).failure == refusal
    fresh = decide(GroupView(sts(), [pod(0), pod(1)], WORLD, WORLD, previous, 8), NOW)
    assert fresh.failure is None and not fresh.hold  # the spec changed: the workers try again
