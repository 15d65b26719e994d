"""The group updates as one: which pods a template change replaces, and what status says."""

from __future__ import annotations

from typing import Any

from moe_operator.group import (
    BACKOFF_RESET_S,
    REVISION_LABEL,
    GangFailure,
    PodRef,
    ReplacementBackoff,
    group_state,
)
from moe_operator.status import Observed, compute_status, recovery_status, status_patch

NOW = "2026-01-01T00:00:00Z"


def sts(generation: int = 2, observed: int = 2, revision: str = "r2") -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {"observedGeneration": observed, "updateRevision": revision},
    }


def pod(rank: int, revision: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"m-{rank}",
        "uid": f"uid-{rank}-{revision}",
        "labels": {REVISION_LABEL: revision},
    }
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta}


def test_a_settled_group_has_nothing_to_replace() -> None:
    state = group_state(sts(), [pod(0, "r2"), pod(1, "r2")])
    assert state.settled and not state.restarting and state.stale == ()


def test_every_pod_of_an_old_revision_is_replaced_at_once() -> None:
    state = group_state(sts(), [pod(0, "r1"), pod(1, "r1"), pod(2, "r2")])
    assert state.stale == (PodRef("m-0", "uid-0-r1"), PodRef("m-1", "uid-1-r1"))
    assert state.restarting and not state.settled


def test_nothing_is_replaced_before_the_controller_saw_the_template() -> None:
    """updateRevision is still the old one: deleting now would bring the old template back."""
    state = group_state(sts(generation=3, observed=2), [pod(0, "r1"), pod(1, "r1")])
    assert state.stale == () and not state.observed and not state.settled


def test_terminating_pods_keep_the_restart_going_but_are_not_deleted_twice() -> None:
    state = group_state(sts(), [pod(0, "r1", deleting=True), pod(1, "r2")])
    assert state.stale == () and state.terminating == 1 and state.restarting


def test_status_during_a_group_restart_is_honest() -> None:
    """Issue 11, item 2: the group serves nothing while it restarts; say so."""
    status = compute_status(
        Observed(
            generation=2,
            workers=4,
            statefulset_exists=True,
            ready_workers=1,
            was_running=True,
            group_restart="replacing all 4 pods of the previous template at once",
        ),
        [],
        NOW,
    )
    conditions = {item["type"]: item for item in status["conditions"]}
    assert status["phase"] == "Deploying"
    assert conditions["Progressing"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "GroupRestart"
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "True"
    assert conditions["Degraded"]["reason"] == "GroupRestart"


def test_a_child_conflict_fails_the_deployment_naming_the_object() -> None:
    conflict = "ConfigMap ns/m-plan exists and is not controlled by MoEDeployment m"
    status = compute_status(Observed(generation=1, workers=4, conflicts=(conflict,)), [], NOW)
    conditions = {item["type"]: item for item in status["conditions"]}
    assert status["phase"] == "Failed"
    assert conditions["ChildrenOwned"]["status"] == "False"
    assert conditions["ChildrenOwned"]["reason"] == "ChildConflict"
    assert "m-plan" in conditions["ChildrenOwned"]["message"]
    assert conditions["SpecValid"]["status"] == "True"


# --- repeated whole-group replacements back off ---------------------------------------------


def test_replacements_in_a_row_back_off_like_crash_loop_backoff() -> None:
    """The first replacement runs at once; each further one in a row waits 10 s, doubling, at
    most 5 minutes after the previous."""
    backoff, now, waits = ReplacementBackoff(), 1_000_000.0, []
    for _ in range(8):
        waits.append(backoff.wait_s(now))
        backoff = backoff.replaced(now)
        now += 1  # fails again at once
    assert waits == [0, 9, 19, 39, 79, 159, 299, 299]
    assert backoff.replacements == 8


def test_a_group_that_lived_ten_minutes_starts_the_count_over() -> None:
    backoff = ReplacementBackoff(replacements=6, last_at=0.0)
    assert backoff.wait_s(BACKOFF_RESET_S - 1) == 0  # 5 min cap passed, still counted
    assert backoff.in_a_row(BACKOFF_RESET_S - 1) == 6
    assert backoff.in_a_row(BACKOFF_RESET_S) == 0
    assert backoff.replaced(BACKOFF_RESET_S) == ReplacementBackoff(1, BACKOFF_RESET_S)


def test_backoff_survives_the_status_round_trip_and_its_schema() -> None:
    backoff = ReplacementBackoff(3, 1_700_000_000.5)
    recovery = status_patch(recovery_status(backoff))  # the API's model: what the CRD accepts
    assert recovery == {"replacements": 3, "lastReplacedAt": 1_700_000_000.5}
    assert ReplacementBackoff.from_status(recovery) == backoff
    assert ReplacementBackoff.from_status(None) == ReplacementBackoff()


def test_a_held_replacement_says_why_and_when() -> None:
    gang = GangFailure((PodRef("m-0", "u0"), PodRef("m-1", "u1")), ("m-1 exited with code 1",))
    message = gang.held_message(4, 37.4)
    assert "m-1 exited with code 1" in message
    assert "replaced 4 times in a row" in message and "in 37 s" in message
