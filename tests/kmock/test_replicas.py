"""Replica groups against the API emulator: several groups, scale-in by draining, and a template
change that starts a new group before the old one goes (surge 1, unavailable 0)."""

from __future__ import annotations

from moe_kmock import (
    MOED,
    NS,
    PDB,
    PODS,
    STS,
    Api,
    Operator,
    Workers,
    eventually,
    small_spec,
    timer_ran,
)

from moe_operator.groups.naming import DRAIN_ANNOTATION


def groups(api: Api) -> set[str]:
    names = {"m1", "m1-g1", "m1-g2"}
    return {name for name in names if api.get(STS, NS, name) is not None}


async def test_replicas_make_groups_and_scale_in_drains_the_highest(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await api.create_moed("m1", {**small_spec(port=workers.port), "replicas": 2})
    await eventually(lambda: groups(api) == {"m1", "m1-g1"}, what="two groups")
    # each its own StatefulSet (group 1 selects its pods by the group label) and budget
    second = api.get(STS, NS, "m1-g1")
    assert second["spec"]["selector"]["matchLabels"]["moe-ep.io/group"] == "1"
    env = {
        e["name"]: e.get("value")
        for e in second["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MOE_MASTER_ADDR"].startswith("m1-g1-0.m1-workers.")  # its own rendezvous
    pdb = await eventually(lambda: api.get(PDB, NS, "m1-g1"), what="group 1's budget")
    assert pdb["spec"]["selector"]["matchLabels"]["moe-ep.io/group"] == "1"
    await eventually(lambda: api.status("m1").get("replicas") == 2, what="status.replicas")
    status = api.status("m1")
    assert status["labelSelector"] == "moe-ep.io/deployment=m1,moe-ep.io/role=leader"
    assert [g["name"] for g in status["groups"]] == ["m1", "m1-g1"]

    await api.patch(MOED, NS, "m1", {"spec": {"replicas": 1}})  # what kubectl scale sets
    await eventually(lambda: groups(api) == {"m1"}, what="the highest group removed")
    assert api.get(PDB, NS, "m1-g1") is None
    await eventually(lambda: api.status("m1").get("replicas") == 1, what="one group left")


async def test_a_template_change_starts_a_new_group_before_the_old_one_drains(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await api.create_moed("m1", small_spec(port=workers.port))
    await eventually(lambda: api.get(STS, NS, "m1"), what="group 0")
    await api.run_pods("m1", 2)
    await eventually(lambda: api.status("m1").get("readyReplicas") == 1, what="serving")
    leader = api.pods("m1")["m1-0"]["metadata"]["labels"]
    await eventually(
        lambda: api.pods("m1")["m1-0"]["metadata"]["labels"].get("moe-ep.io/traffic") == "on",
        what="the leader labelled",
    )
    assert "moe-ep.io/role" not in api.pods("m1")["m1-1"]["metadata"]["labels"]
    old_template = api.get(STS, NS, "m1")["spec"]["template"]

    await api.patch(MOED, NS, "m1", {"spec": {"worker": {"image": "example/moe:2"}}})
    await eventually(lambda: "m1-g1" in groups(api), what="a new group first")
    # the old group is untouched and takes traffic until the new one serves
    assert api.get(STS, NS, "m1")["spec"]["template"] == old_template
    assert DRAIN_ANNOTATION not in (api.get(STS, NS, "m1")["metadata"].get("annotations") or {})
    assert api.pods("m1")["m1-0"]["metadata"]["labels"]["moe-ep.io/traffic"] == "on"
    assert leader is not None

    await api.run_pods("m1-g1", 2)  # the new group forms and serves

    def drained_or_gone() -> bool:
        old = api.get(STS, NS, "m1")
        return old is None or DRAIN_ANNOTATION in (old["metadata"].get("annotations") or {})

    await eventually(drained_or_gone, what="the old group drains")
    await eventually(lambda: groups(api) == {"m1-g1"}, what="the old group removed", timeout=20)
    assert api.get(STS, NS, "m1-g1")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "example/moe:2"
    )


async def test_a_refused_update_holds_the_new_group_while_the_old_one_serves_on(
    api: Api, workers: Workers, operator: Operator
) -> None:
    """Issue 19's held refusal with groups: the new group's workers refuse the new spec (exit 2),
    so it is held at 0 pods for that generation; the old group, of the older template, is
    neither held nor drained (the surge waits for a new group that serves)."""
    await api.create_moed("m1", small_spec(port=workers.port))
    await eventually(lambda: api.get(STS, NS, "m1"), what="group 0")
    await api.run_pods("m1", 2)
    await eventually(lambda: api.status("m1").get("readyReplicas") == 1, what="serving")
    await api.patch(MOED, NS, "m1", {"spec": {"worker": {"image": "example/moe:2"}}})
    await eventually(lambda: "m1-g1" in groups(api), what="a new group first")
    await api.run_pods("m1-g1", 2, ready=0)  # started, never ready: rank 0 refuses
    refusal = {"terminated": {"exitCode": 2, "message": "rank 0: the checkpoint is invalid"}}
    worker = {"name": "worker", "image": "example/moe:2", "imageID": "", "ready": False}
    status = {"containerStatuses": [{**worker, "restartCount": 1, "state": refusal}]}
    await api.patch(PODS, NS, "m1-g1-0", {"status": status}, sub="status")

    def held() -> bool:
        return api.get(STS, NS, "m1-g1")["spec"]["replicas"] == 0

    def recorded() -> bool:
        return (api.status("m1").get("refusal") or {}).get("generation") == 2

    await eventually(lambda: held() and recorded(), what="the new group held at 0 pods")
    await timer_ran(3)
    assert held() and api.get(STS, NS, "m1")["spec"]["replicas"] == 2
    assert DRAIN_ANNOTATION not in (api.get(STS, NS, "m1")["metadata"].get("annotations") or {})
    assert api.pods("m1")["m1-0"]["metadata"]["labels"]["moe-ep.io/traffic"] == "on"
    assert api.requests("delete", PODS, NS, "m1-0") == []
    phases = {g["name"]: g["phase"] for g in api.status("m1")["groups"]}
    assert phases == {"m1": "Outdated", "m1-g1": "Failed"}, phases
