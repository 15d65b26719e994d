"""Pure status computation: phases and standard conditions."""

from __future__ import annotations

from moe_operator.api import PlanStatus
from moe_operator.status import Observed, compute_status

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _conditions(status: dict) -> dict[str, dict]:
    return {item["type"]: item for item in status["conditions"]}


def test_invalid_spec_is_failed_with_the_problem_in_spec_valid() -> None:
    status = compute_status(
        Observed(generation=3, workers=0, spec_problems=("spec.model.topK: too big",)), [], NOW
    )
    assert status["phase"] == "Failed" and status["observedGeneration"] == 3
    condition = _conditions(status)["SpecValid"]
    assert condition["status"] == "False" and "spec.model.topK" in condition["message"]


def test_phase_follows_readiness_and_plan() -> None:
    base = {"generation": 1, "workers": 4, "statefulset_exists": True}
    assert compute_status(Observed(generation=1, workers=4), [], NOW)["phase"] == "Pending"
    assert compute_status(Observed(**base, ready_workers=2), [], NOW)["phase"] == "Deploying"
    assert (
        compute_status(Observed(**base, ready_workers=2, was_running=True), [], NOW)["phase"]
        == "Degraded"
    )
    running = compute_status(
        Observed(**base, ready_workers=4, plan=PlanStatus(version=2, applied_version=2)), [], NOW
    )
    assert running["phase"] == "Running" and running["ready"] == "4/4"
    assert _conditions(running)["Ready"]["status"] == "True"
    pending = Observed(**base, ready_workers=4, plan=PlanStatus(version=3, applied_version=2))
    assert compute_status(pending, [], NOW)["phase"] == "Rebalancing"


def test_balanced_condition_compares_with_the_threshold() -> None:
    base = {"generation": 1, "workers": 4, "statefulset_exists": True, "ready_workers": 4}
    above = compute_status(Observed(**base, worst_imbalance=1.6, imbalance_threshold=1.25), [], NOW)
    assert _conditions(above)["Balanced"]["status"] == "False" and above["imbalance"] == "1.60"
    below = compute_status(Observed(**base, worst_imbalance=1.1, imbalance_threshold=1.25), [], NOW)
    assert _conditions(below)["Balanced"]["status"] == "True"


def test_skipped_evaluation_says_why() -> None:
    status = compute_status(
        Observed(
            generation=1,
            workers=4,
            statefulset_exists=True,
            loads_problem="counter reset on rank 2",
        ),
        [],
        NOW,
    )
    assert _conditions(status)["LoadsRead"]["message"] == "counter reset on rank 2"


def test_transition_time_changes_only_when_status_changes() -> None:
    observed = Observed(generation=1, workers=4, statefulset_exists=True, ready_workers=4)
    first = compute_status(observed, [], NOW)
    same = compute_status(observed, first["conditions"], LATER)
    assert _conditions(same)["Ready"]["lastTransitionTime"] == NOW
    lost = compute_status(
        Observed(
            generation=1, workers=4, statefulset_exists=True, ready_workers=3, was_running=True
        ),
        same["conditions"],
        LATER,
    )
    assert _conditions(lost)["Ready"]["lastTransitionTime"] == LATER
    assert _conditions(lost)["Degraded"]["status"] == "True"


def test_a_failed_hand_off_is_named_in_progressing() -> None:
    status = compute_status(
        Observed(
            generation=1,
            workers=4,
            statefulset_exists=True,
            ready_workers=4,
            plan=PlanStatus(version=3, applied_version=2),
            handoff_problem="POST http://10.0.0.1:8080/v1/plan: connection refused",
        ),
        [],
        NOW,
    )
    progressing = _conditions(status)["Progressing"]
    assert status["phase"] == "Rebalancing" and progressing["reason"] == "ApplyingPlan"
    assert "connection refused" in progressing["message"]


def _status_schema() -> dict:
    from pathlib import Path

    import yaml

    crd = yaml.safe_load(
        (Path(__file__).parents[2] / "crds/moedeployments.moe-ep.io.yaml").read_text()
    )
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_group_entries_never_carry_nulls_the_crd_refuses() -> None:
    # A list is replaced whole by a merge patch: a None inside a group entry would be stored as
    # null, and the API server refuses the whole status write (422) — every run, forever. It
    # reads an empty string as null too (degraded="").
    import jsonschema

    from moe_operator.api import MembershipStatus, ReplicaGroupStatus

    groups = (
        ReplicaGroupStatus(name="a", index=0, recovery=None, membership=None, degraded=""),
        ReplicaGroupStatus(
            name="a-g1",
            index=1,
            phase="Degraded",
            membership=MembershipStatus(epoch=2, ranks=2, live_ranks=[0], lost_ranks=[1]),
            degraded="RankLost",
        ),
    )
    status = compute_status(
        Observed(generation=1, workers=4, statefulset_exists=True, replicas=2, groups=groups),
        [],
        NOW,
    )
    plain, lost = status["groups"]
    assert "membership" not in plain and "recovery" not in plain and "degraded" not in plain
    assert lost["membership"]["lostRanks"] == [1] and lost["degraded"] == "RankLost"
    stored = {key: value for key, value in status.items() if value is not None}  # None removes
    jsonschema.validate(stored, _status_schema())
    broken = {**stored, "groups": [{**plain, "membership": None}]}
    try:
        jsonschema.validate(broken, _status_schema())
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema should refuse a null inside a group entry")
