"""The rollout decision of replica groups (pure): surge before drain, one group at a time,
scale-in drains, restarts in place without surge, drains that end."""

from __future__ import annotations

import pytest

from moe_operator.groups.naming import group_index, group_name, pod_labels
from moe_operator.groups.rollout import Drain, Group, Policy, decide_rollout, drained

NOW = 1000.0


def serving(index: int, current: bool = True) -> Group:
    return Group(index, current=current, serving=True)


def test_a_new_deployment_starts_its_groups() -> None:
    assert decide_rollout([], Policy(replicas=2), NOW).create == (0, 1)


def test_a_template_change_starts_a_new_group_before_an_old_one_goes() -> None:
    policy = Policy(replicas=1)
    first = decide_rollout([serving(0, current=False)], policy, NOW)
    assert first.create == (1,) and first.drain == ()
    # the new group forms: the old one stays, serving, until the new one serves
    starting = decide_rollout(
        [serving(0, current=False), Group(1, current=True, serving=False)], policy, NOW
    )
    assert starting.create == () and starting.drain == () and "stays" in starting.waiting
    ready = decide_rollout([serving(0, current=False), serving(1)], policy, NOW)
    assert ready.drain == ((0, "remove"),)


def test_groups_are_replaced_one_at_a_time() -> None:
    policy = Policy(replicas=2, max_surge=1)
    old = [serving(0, current=False), serving(1, current=False)]
    assert decide_rollout(old, policy, NOW).create == (2,)  # one above replicas, no more
    both = decide_rollout([*old, serving(2)], policy, NOW)
    assert both.drain == ((1, "remove"),)  # the highest old one first
    draining = [old[0], Group(1, False, True, Drain("remove", NOW)), serving(2)]
    waiting = decide_rollout(draining, policy, NOW + 1)
    assert waiting.drain == () and waiting.create == () and waiting.remove == ()


def test_a_drain_ends_when_the_leader_is_idle_after_the_settle_or_at_the_grace() -> None:
    policy = Policy(replicas=1, drain_timeout_s=30.0, settle_s=5.0)
    busy = Group(0, False, True, Drain("remove", NOW), in_flight=3)
    idle = Group(0, False, True, Drain("remove", NOW), in_flight=0)
    assert not drained(idle, policy, NOW + 1)  # the router may still send for a moment
    assert drained(idle, policy, NOW + 6)
    assert not drained(busy, policy, NOW + 29)
    assert drained(busy, policy, NOW + 30)  # the grace period is over
    dark = Group(0, False, False, Drain("remove", NOW), in_flight=None)
    assert drained(dark, policy, NOW)  # serves nothing: nothing to wait for
    out = decide_rollout([idle, serving(1)], policy, NOW + 6)
    assert out.remove == (0,) and out.create == ()


def test_scale_in_drains_the_highest_group_and_keeps_the_floor() -> None:
    assert decide_rollout([serving(0), serving(1)], Policy(replicas=1), NOW).drain == (
        (1, "remove"),
    )
    # a group that serves nothing goes first, whatever its number
    broken = [Group(0, True, False), serving(1)]
    assert decide_rollout(broken, Policy(replicas=1), NOW).drain == ((0, "remove"),)


def test_scale_out_takes_the_lowest_free_numbers_not_still_terminating() -> None:
    out = decide_rollout([serving(1)], Policy(replicas=3), NOW, taken=frozenset({0}))
    assert out.create == (2, 3)


def test_without_surge_an_old_group_is_drained_then_restarted_in_place() -> None:
    policy = Policy(replicas=2, max_surge=0, max_unavailable=1)
    old = [serving(0, current=False), serving(1, current=False)]
    first = decide_rollout(old, policy, NOW)
    assert first.create == () and first.drain == ((1, "restart"),)
    done = [old[0], Group(1, False, True, Drain("restart", NOW), in_flight=0)]
    assert decide_rollout(done, policy, NOW + 6).restart == (1,)
    # group 1 restarts on the new template: group 0 waits until it serves again
    restarting = [old[0], Group(1, True, False)]
    assert decide_rollout(restarting, policy, NOW + 7).drain == ()
    assert decide_rollout([old[0], serving(1)], policy, NOW + 60).drain == ((0, "restart"),)


def test_of_two_current_groups_the_one_that_does_not_serve_goes() -> None:
    policy = Policy(replicas=1, max_surge=1, max_unavailable=0)
    out = decide_rollout([serving(0), Group(1, True, False)], policy, NOW)
    assert out.drain == ((1, "remove"),) and out.create == ()


@pytest.mark.parametrize("text", ["", "remove", "remove x", "stop 1.0", None])
def test_an_unreadable_drain_annotation_is_no_drain(text: str | None) -> None:
    assert Drain.parse(text) is None


def test_drain_annotation_round_trip() -> None:
    assert Drain.parse(Drain("restart", 12.5).annotation()) == Drain("restart", 12.5)


def test_group_names_keep_group_0_on_the_old_names() -> None:
    assert group_name("m", 0) == "m" and group_name("m", 3) == "m-g3"
    assert group_index("m", "m") == 0 and group_index("m", "m-g3") == 3
    assert group_index("m", "m-g03") is None and group_index("m", "mm-g1") is None
    assert group_index("m", "m-router") is None
    leader = pod_labels(2, leader=True, traffic=False)
    assert leader == {
        "moe-ep.io/group": "2",
        "moe-ep.io/role": "leader",
        "moe-ep.io/traffic": "off",
    }
    assert pod_labels(2, leader=False, traffic=True)["moe-ep.io/role"] is None


def test_an_old_group_stays_until_the_router_can_have_found_its_successor() -> None:
    # One group: the old leader is all the router has until it finds the new one (pod watch,
    # then a health check); draining it the second the new gang is ready left smg with no
    # worker for a moment (503s in the e2e availability run).
    policy = Policy(replicas=1)
    just_ready = Group(1, current=True, serving=True, serving_since=NOW - 1.0)
    early = decide_rollout([serving(0, current=False), just_ready], policy, NOW)
    assert early.drain == () and "router" in early.waiting
    later = decide_rollout([serving(0, current=False), just_ready], policy, NOW + 5.0)
    assert later.drain == ((0, "remove"),)
    # a group that does not serve goes at once: nothing to wait for
    dark = Group(0, current=False, serving=False)
    assert decide_rollout([dark, just_ready], policy, NOW).drain == ((0, "remove"),)


def test_a_groups_serving_since_is_when_its_last_pod_became_ready() -> None:
    from moe_operator.groups.read import GroupRead

    def pod(name: str, ready_at: str | None) -> dict:
        conditions = [] if ready_at is None else [
            {"type": "Ready", "status": "True", "lastTransitionTime": ready_at}
        ]  # fmt: skip
        return {"metadata": {"name": name}, "status": {"conditions": conditions}}

    sts = {"metadata": {"name": "a"}, "status": {"readyReplicas": 2}}
    read = GroupRead(
        0, sts, [pod("a-0", "2026-01-01T00:00:10Z"), pod("a-1", "2026-01-01T00:00:20Z")], True
    )
    assert read.serving_since() == 1767225620.0
    unknown = GroupRead(0, sts, [pod("a-0", "2026-01-01T00:00:10Z"), pod("a-1", None)], True)
    assert unknown.serving_since() is None
