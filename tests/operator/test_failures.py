"""Start-up refusals read from the pods' status: which worker, why, and how status says it."""

from __future__ import annotations

from typing import Any

from moe_operator.failures import STARTUP_EXIT_CODE, StartupFailure, startup_failure
from moe_operator.status import Observed, compute_status

NOW = "2026-01-01T00:00:00Z"
MISMATCH = (
    "rank {rank}: the checkpoint does not match the model shape: layers: the MoEDeployment "
    "says 3, /models/tiny/config.json says 2"
)


def pod(
    name: str,
    *,
    state: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    status = {"name": "worker", "state": state or {}, "lastState": last or {}}
    metadata: dict[str, Any] = {"name": name}
    if deleting:
        metadata["deletionTimestamp"] = NOW
    return {"metadata": metadata, "status": {"containerStatuses": [status]}}


def refused(rank: int, code: int = STARTUP_EXIT_CODE, message: str | None = None) -> dict:
    text = MISMATCH.format(rank=rank) if message is None else message
    return {"terminated": {"exitCode": code, "message": text}}


def test_a_crash_looping_worker_is_named_with_its_message() -> None:
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    pods = [pod("m-1", state=waiting, last=refused(1)), pod("m-0", state=refused(0))]
    failure = startup_failure(pods)
    assert failure is not None and failure.reason == "CheckpointMismatch"
    assert failure.pods == ("m-0", "m-1")  # lowest rank first: its message is shown
    assert failure.message == MISMATCH.format(rank=0)
    text = failure.describe(4)
    assert "2 of 4 workers refused to start" in text
    assert "says 3" in text and "config.json says 2" in text  # both values named


def test_running_deleted_and_other_exits_are_no_refusal() -> None:
    running = {"running": {"startedAt": NOW}}
    assert startup_failure([pod("m-0", state=running, last=refused(0))]) is None  # history
    assert startup_failure([pod("m-0", state=refused(0), deleting=True)]) is None
    assert startup_failure([pod("m-0", state=refused(0, code=1))]) is None  # a crash, not a refusal
    assert startup_failure([pod("m-0")]) is None
    assert startup_failure([{"metadata": {"name": "m-0"}, "status": {}}]) is None


def test_other_refusals_keep_their_message() -> None:
    message = "rank 0: /models/tiny/config.json does not exist"
    failure = startup_failure([pod("m-0", state=refused(0, message=message))])
    assert failure is not None and failure.reason == "WorkerStartupFailed"
    assert failure.message == message
    silent = startup_failure([pod("m-0", state=refused(0, message=""))])
    assert silent is not None and "exited with code 2" in silent.message


def test_a_damaged_checkpoint_is_its_own_reason_and_its_record_round_trips() -> None:
    message = (
        "rank 0: the checkpoint is invalid: /models/tiny/model-00002-of-00003.safetensors: "
        "missing: model.safetensors.index.json lists it for 5 tensors"
    )
    failure = startup_failure([pod("m-0", state=refused(0, message=message))])
    assert failure is not None and failure.reason == "CheckpointInvalid"
    assert "repair or replace the file named" in failure.describe(2)
    assert "0 pods) until the spec changes" in failure.describe(2)
    record = failure.record(5)
    assert StartupFailure.held(record, 5) == failure
    assert StartupFailure.held(record, 6) is None  # the spec moved on
    assert StartupFailure.held({**record, "message": 3}, 5) is None  # edited: not held
    assert StartupFailure.held(None, 5) is None
    status = compute_status(
        Observed(generation=5, workers=2, statefulset_exists=True, refusal=record), [], NOW
    )
    assert status["refusal"] == record
    assert (
        compute_status(Observed(generation=6, workers=2, statefulset_exists=True), [], NOW)[
            "refusal"
        ]
        is None
    )  # merge-patch null: removed


def test_status_shows_the_refusal_in_ready_and_fails_the_phase() -> None:
    failure = startup_failure([pod("m-0", state=refused(0))])
    observed = Observed(generation=2, workers=2, statefulset_exists=True, startup_failure=failure)
    status = compute_status(observed, [], NOW)
    conditions = {item["type"]: item for item in status["conditions"]}
    assert status["phase"] == "Failed"
    ready = conditions["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "CheckpointMismatch"
    assert "the MoEDeployment says 3" in ready["message"] and "says 2" in ready["message"]
    assert conditions["Progressing"]["status"] == "False"
    # While the group restarts for a new template, the old pods' refusals are not the news.
    restarting = compute_status(
        Observed(
            generation=3,
            workers=2,
            statefulset_exists=True,
            startup_failure=failure,
            group_restart="replacing all 2 pods",
        ),
        [],
        NOW,
    )
    assert restarting["phase"] == "Deploying"
    assert {item["type"]: item for item in restarting["conditions"]}["Ready"][
        "reason"
    ] == "GroupRestart"


def test_status_carries_the_endpoint_once_children_exist() -> None:
    observed = Observed(
        generation=1,
        workers=2,
        statefulset_exists=True,
        endpoint="http://m-api.ml.svc:8000/v1",
        served_model_name="tiny",
    )
    status = compute_status(observed, [], NOW)
    assert status["endpoint"] == "http://m-api.ml.svc:8000/v1"
    assert status["servedModelName"] == "tiny"
    assert "endpoint" not in compute_status(Observed(generation=1, workers=0), [], NOW)
