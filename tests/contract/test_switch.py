"""The switch answer is the wire format of POST /v1/plan (docs/worker.md's control-app table): each
answer's body and status, and the operator's lenient reading of any body the leader may send."""

from __future__ import annotations

from typing import Any

import pytest

from moe_contract.plan import round_robin_plan
from moe_contract.switch import (
    BACKGROUND,
    BLOCKING,
    DOES_NOT_FIT,
    GROUP_FAILED,
    NOT_READY,
    STALE,
    TIMEOUT,
    TRANSFER_FAILED,
    SwitchAnswer,
)

PLAN = round_robin_plan(2, 4, 2, 2, version=7)


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (
            SwitchAnswer.switched(PLAN, 0.25, BACKGROUND, 1.5),
            200,
            {
                "applied": True,
                "version": 7,
                "digest": PLAN.digest(),
                "pauseSeconds": 0.25,
                "mode": "background",
                "transferSeconds": 1.5,
            },
        ),
        (
            SwitchAnswer.switched(PLAN, 2.0, BLOCKING),
            200,
            {
                "applied": True,
                "version": 7,
                "digest": PLAN.digest(),
                "pauseSeconds": 2.0,
                "mode": "blocking",
            },
        ),
        (
            SwitchAnswer.refused(STALE, version=7),
            409,
            {"applied": False, "reason": "stale", "version": 7},
        ),
        (
            SwitchAnswer.refused(DOES_NOT_FIT, version=6, error="rank 1: failed: PlanError: ..."),
            422,
            {
                "applied": False,
                "reason": "does not fit",
                "version": 6,
                "error": "rank 1: failed: PlanError: ...",
            },
        ),
        (SwitchAnswer.refused(TIMEOUT), 504, {"applied": False, "reason": "timeout"}),
        (
            SwitchAnswer.refused(TRANSFER_FAILED, version=6, error="rank 2: failed: gone"),
            503,
            {
                "applied": False,
                "reason": "transfer failed",
                "version": 6,
                "error": "rank 2: failed: gone",
            },
        ),
        (
            SwitchAnswer.refused(GROUP_FAILED, error="peer closed"),
            503,
            {"applied": False, "reason": "group failed", "error": "peer closed"},
        ),
        (SwitchAnswer.refused(NOT_READY), 503, {"applied": False, "reason": "not ready"}),
    ],
)
def test_each_answer_has_its_documented_body_and_status(
    answer: SwitchAnswer, status: int, body: dict[str, Any]
) -> None:
    assert (answer.http_status, answer.to_document()) == (status, body)
    assert SwitchAnswer.from_document(body) == answer


def test_any_body_decodes_and_wrong_types_are_unknown() -> None:
    refusal = SwitchAnswer.from_document({"error": "slots[0]: bad", "field": "slots[0]"})
    assert refusal == SwitchAnswer(applied=False, error="slots[0]: bad")
    assert SwitchAnswer.from_document({}) == SwitchAnswer(applied=False)
    odd = {"applied": "yes", "version": True, "pauseSeconds": "1", "digest": 3, "reason": 409}
    assert SwitchAnswer.from_document(odd) == SwitchAnswer(applied=False)
    assert SwitchAnswer.from_document({"applied": True, "pauseSeconds": 1}).pause_seconds == 1.0
