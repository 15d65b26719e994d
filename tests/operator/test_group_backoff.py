"""Each replica group backs off its own whole-group replacements (status.groups[].recovery): a
group that keeps failing never holds back the first replacement of another (issue 23)."""

from __future__ import annotations

from typing import Any

from moe_operator.group import ReplacementBackoff
from moe_operator.groups.report import group_previous
from moe_operator.recovery import decide
from tests.operator.test_recovery import NOW, died, pod, view

HELD = {"replacements": 2, "lastReplacedAt": NOW - 5}  # in a row, the last 5 s ago: wait


def _status(**fields: Any) -> dict[str, Any]:
    return {"phase": "Degraded", **fields}


def test_a_group_reads_its_own_backoff_not_another_groups() -> None:
    status = _status(
        recovery=HELD,  # the last group replaced (group 1), as the top level shows it
        groups=[{"name": "m", "index": 0}, {"name": "m-g1", "index": 1, "recovery": HELD}],
    )
    first = decide(view([died(0), pod(1)], group_previous(status, 0)), NOW)
    assert first.delete and first.backoff == ReplacementBackoff(1, NOW)  # at once
    second = decide(view([died(0), pod(1)], group_previous(status, 1)), NOW)
    assert second.delete == () and second.backoff == ReplacementBackoff(2, NOW - 5)  # held
    assert group_previous(status, 1)["phase"] == "Degraded"  # the rest of status as it was


def test_a_new_group_starts_with_no_backoff() -> None:
    status = _status(recovery=HELD, groups=[{"name": "m", "index": 0, "recovery": HELD}])
    assert group_previous(status, 1)["recovery"] is None


def test_group_0_takes_the_top_level_backoff_an_older_operator_wrote() -> None:
    """An operator before replica groups wrote status.recovery and no groups: after the
    upgrade, group 0 keeps backing off where it was."""
    status = _status(recovery=HELD)
    held = decide(view([died(0), pod(1)], group_previous(status, 0)), NOW)
    assert held.delete == () and held.backoff == ReplacementBackoff(2, NOW - 5)
