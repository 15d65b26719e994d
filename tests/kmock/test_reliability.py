"""Issue 11 against kmock: nothing lost, nothing hijacked, no error stops an object.

The operator runs for real; kmock is the API server (with the metadata and preconditions a real
one keeps) and the test plays the StatefulSet controller and kubelets (`Api.run_pods`,
`Api.set_ready`). One fake leader serves plans by version and digest (see `Workers`).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from moe_kmock import (
    CM,
    MOED,
    NS,
    PODS,
    SECRET,
    STS,
    SVC,
    Api,
    Fault,
    Operator,
    Workers,
    eventually,
    small_spec,
    timer_ran,
)
from prometheus_client import REGISTRY

from moe_contract.plan import Plan, parse_plan, validate_plan
from moe_operator import group

IN_PLACE = {"maxSurge": 0, "maxUnavailable": 1}
"""No group above replicas: a template change drains the group and restarts it in place."""


async def deploy(api: Api, workers: Workers, name: str = "m1", **spec: Any) -> None:
    await api.create_moed(name, small_spec(port=workers.port, **spec))
    await eventually(lambda: api.token(name) and api.get(STS, NS, name), what="children")
    workers.token = api.token(name)
    workers.durable = lambda: (api.plan(name) or {}).get("version")
    await api.run_pods(name, workers.world)


def plan_status(api: Api, name: str = "m1") -> dict[str, Any]:
    return api.status(name).get("plan") or {}


def reasons(api: Api, name: str = "m1") -> set[str]:
    return {event["reason"] for event in api.events(NS, name)}


async def balanced_on(api: Api, workers: Workers, version: int) -> None:
    await eventually(lambda: workers.version == version, what=f"leader on plan {version}")
    await eventually(
        lambda: plan_status(api).get("appliedVersion") == version == plan_status(api)["version"],
        what=f"status says plan {version} applied",
    )


async def new_group_serves_the_kept_plan(
    api: Api, workers: Workers, old: dict[str, dict[str, Any]]
) -> None:
    """The replaced group runs: all new pods, deleted once, on plan 2 applied once."""
    await api.run_pods("m1", 2)
    await eventually(lambda: api.status("m1").get("phase") == "Running", what="Running again")
    assert {pod["metadata"]["uid"] for pod in api.pods("m1").values()}.isdisjoint(
        pod["metadata"]["uid"] for pod in old.values()
    )
    await timer_ran()
    assert len(api.requests("delete", PODS, NS, "m1-0")) == 1  # one group restart, not more
    assert plan_status(api)["version"] == 2 and workers.applied == [2]  # the plan is kept


def desired_versions(api: Api, name: str = "m1") -> list[int]:
    return [
        version["status"]["plan"]["version"]
        for version in api.history(MOED, NS, name)
        if (version.get("status") or {}).get("plan")
    ]


# --- item 1: the plan survives its ConfigMap --------------------------------------------------


async def test_a_deleted_or_corrupted_plan_configmap_is_restored_never_rolled_back(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await deploy(api, workers)
    await balanced_on(api, workers, 2)
    serving = Plan.model_validate(workers.plan)

    # Deleted: recreated with the plan the leader serves, same version and contents.
    await api.delete(CM, NS, "m1-plan")
    await eventually(lambda: api.plan("m1") is not None, what="ConfigMap recreated")
    assert parse_plan(api.plan("m1")).digest() == serving.digest()
    await eventually(lambda: "PlanRecovered" in reasons(api), what="PlanRecovered event")

    # Corrupted: the same.
    key = api.plan_key("m1")
    await api.patch(CM, NS, "m1-plan", {"data": {key: "{not json"}})
    await eventually(
        lambda: (api.get(CM, NS, "m1-plan")["data"][key]).startswith('{"'), what="repaired"
    )
    assert parse_plan(api.plan("m1")).digest() == serving.digest()

    # Deleted while the leader cannot say what it serves: a fresh plan above every version.
    await workers.stop(0)
    await api.delete(CM, NS, "m1-plan")
    await eventually(lambda: api.plan("m1") is not None, what="ConfigMap recreated")
    fresh = parse_plan(api.plan("m1"))
    assert fresh.version == 3 and fresh.method == "RoundRobin"
    await workers.start(0)
    # Handed off like any plan; round-robin is skewed again, so detection (not stuck "in
    # flight") rebalances once more: the loop goes on from version 3, never from 1.
    await balanced_on(api, workers, 4)
    assert workers.applied == [2, 3, 4]
    versions = desired_versions(api)
    assert versions == sorted(versions), f"status plan version went back: {versions}"


async def test_an_operator_upgrade_keeps_the_versions_of_a_running_deployment(
    api: Api, workers: Workers, operator: Operator
) -> None:
    """Operators before the ledger kept copies of the versions in status.detection: the new one
    reads them (the highest copy counts, so no version is issued twice), keeps what runs, and
    leaves one copy, status.plan."""
    await deploy(api, workers)
    await balanced_on(api, workers, 2)
    await operator.stop()
    posts = len(workers.posts)
    older = {"aboveCount": 0, "desiredVersion": 2, "appliedVersion": 2, "lastRebalanceAt": 1.0}
    await api.patch(MOED, NS, "m1", {"status": {"detection": older}}, sub="status")
    await operator.start()
    await eventually(lambda: not legacy_copies(api), what="one copy of the versions")
    await timer_ran()
    status = api.status("m1")
    assert status["plan"]["version"] == status["plan"]["appliedVersion"] == 2
    assert workers.applied == [2] and len(workers.posts) == posts  # nothing issued nor resent

    # Copies that disagree (this one says plan 5 was issued), and the record lost: a new plan
    # above the highest, not the leader's plan 2 restored.
    await operator.stop()
    await api.delete(CM, NS, "m1-plan")
    ahead = {**older, "desiredVersion": 5}
    await api.patch(MOED, NS, "m1", {"status": {"detection": ahead}}, sub="status")
    since = len(desired_versions(api))
    await operator.start()
    await eventually(lambda: api.plan("m1") is not None, what="ConfigMap recreated")
    assert parse_plan(api.plan("m1")).version == 6
    await eventually(lambda: 6 in workers.applied, what="plan 6 applied")
    assert min(desired_versions(api)[since:]) == 6 and not legacy_copies(api)


def legacy_copies(api: Api, name: str = "m1") -> dict[str, Any]:
    detection = api.status(name).get("detection") or {}
    return {key: detection[key] for key in ("desiredVersion", "appliedVersion") if key in detection}


# --- item 2: the group updates as one ---------------------------------------------------------


async def test_a_template_change_replaces_the_whole_group_once(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await deploy(api, workers, updateStrategy=IN_PLACE)  # the group restarts in place
    await balanced_on(api, workers, 2)
    old = api.pods("m1")
    assert api.get(STS, NS, "m1")["spec"]["updateStrategy"]["type"] == "OnDelete"

    await api.patch(MOED, NS, "m1", {"spec": {"worker": {"masterPort": 29600}}})
    await eventually(
        lambda: "29600" in str(api.get(STS, NS, "m1")["spec"]["template"]), what="template"
    )
    uids = {pod: body["metadata"]["uid"] for pod, body in api.pods("m1").items()}
    assert uids == {pod: body["metadata"]["uid"] for pod, body in old.items()}  # nothing replaced
    # before the controller saw the template
    await api.set_ready("m1", 2)  # the controller: a new updateRevision, pods untouched
    await eventually(lambda: not api.pods("m1"), what="every old pod deleted")
    deletes = api.requests("delete", PODS, NS, "m1-0") + api.requests("delete", PODS, NS, "m1-1")
    assert len(deletes) == 2, "each pod deleted exactly once"
    await api.set_ready("m1", 0)
    await eventually(
        lambda: (
            api.condition("m1", "Progressing").get("reason") == "GroupRestart"
            or api.status("m1").get("phase") == "Deploying"
        ),
        what="status says the group restarts",
    )
    assert api.condition("m1", "Ready")["status"] == "False"
    assert api.condition("m1", "Degraded")["status"] == "True"  # nothing serves meanwhile

    await new_group_serves_the_kept_plan(api, workers, old)


async def restart_worker(api: Api, pod: str) -> None:
    """What the kubelet reports once it restarted the pod's worker (a rank died)."""
    restarted = {
        "name": "worker",
        "image": "moe-worker",
        "imageID": "",
        "ready": False,
        "restartCount": 1,
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "rank 1 was killed by SIGKILL"}},
    }
    await api.patch(PODS, NS, pod, {"status": {"containerStatuses": [restarted]}}, sub="status")


async def test_a_restarted_worker_brings_the_whole_group_back_on_its_plan(
    api: Api, workers: Workers, operator: Operator
) -> None:
    """Issue 12, item 5: the kubelet restarted one worker (a rank died, or failed liveness):
    every pod of the group is deleted once, status says Degraded naming the pod and rank until
    the new group is ready; the plan is kept, never re-issued."""
    await deploy(api, workers)
    await balanced_on(api, workers, 2)
    old = api.pods("m1")
    await restart_worker(api, "m1-1")
    await eventually(lambda: not api.pods("m1"), what="every pod deleted")
    await eventually(
        lambda: api.condition("m1", "Degraded").get("reason") == "GroupRecovering",
        what="status says the group recovers",
    )
    degraded = api.condition("m1", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "GroupRecovering"), degraded
    assert "m1-1" in degraded["message"] and "rank 1 was killed" in degraded["message"]
    assert api.status("m1")["phase"] == "Degraded"
    await eventually(lambda: "GroupRecovering" in reasons(api), what="a GroupRecovering Event")
    await api.set_ready("m1", 0)
    await timer_ran()
    assert api.condition("m1", "Degraded")["reason"] == "GroupRecovering"  # until it serves

    await new_group_serves_the_kept_plan(api, workers, old)


async def test_a_group_that_fails_again_is_replaced_after_a_backoff(
    api: Api, workers: Workers, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replaced group's pods start with no restart history, so only the operator can slow a
    group that keeps failing: the second replacement in a row waits (here: until the test
    shortens the backoff), Degraded says so and one GroupBackoff Event is posted."""
    monkeypatch.setattr(group, "BACKOFF_FIRST_S", 3600.0)
    await deploy(api, workers)
    await balanced_on(api, workers, 2)
    first = api.pods("m1")
    await restart_worker(api, "m1-1")
    await eventually(lambda: not api.pods("m1"), what="the first replacement, at once")
    await new_group_serves_the_kept_plan(api, workers, first)
    assert api.status("m1")["recovery"]["replacements"] == 1

    await restart_worker(api, "m1-0")
    held = "replaced 1 times in a row"
    await eventually(
        lambda: held in api.condition("m1", "Degraded").get("message", ""),
        what="Degraded names the backoff",
    )
    await timer_ran(4)
    assert len(api.pods("m1")) == 2 and len(api.requests("delete", PODS, NS, "m1-0")) == 1
    assert [e["reason"] for e in api.events(NS, "m1")].count("GroupBackoff") == 1
    assert api.status("m1")["phase"] == "Degraded"

    monkeypatch.setattr(group, "BACKOFF_FIRST_S", 0.0)  # the backoff has passed
    await eventually(lambda: not api.pods("m1"), what="the second replacement")
    await eventually(
        lambda: api.status("m1")["recovery"]["replacements"] == 2, what="counted in status"
    )


async def test_a_shape_change_gives_only_the_new_pods_the_new_plan(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await deploy(api, workers, updateStrategy=IN_PLACE)  # the group restarts in place
    await balanced_on(api, workers, 2)
    old_key = api.plan_key("m1")
    old_plan = api.plan("m1")

    await api.patch(MOED, NS, "m1", {"spec": {"model": {"layers": 4}}})
    await eventually(lambda: api.plan_key("m1") != old_key, what="template on the new key")
    configmap = api.get(CM, NS, "m1-plan")
    new_key = api.plan_key("m1")
    new_plan = parse_plan(configmap["data"][new_key])
    validate_plan(new_plan, num_layers=4, num_experts=4, world_size=2)
    assert new_plan.version == 3  # above everything issued
    # The old pods, still running, keep mapping the old key: it is untouched.
    assert parse_plan(configmap["data"][old_key]).to_document() == old_plan
    assert all(
        volume["configMap"]["items"][0]["key"] == old_key
        for pod in api.pods("m1").values()
        for volume in pod["spec"]["volumes"]
        if volume["name"] == "plan"
    )
    await timer_ran()
    assert [post["body"]["version"] for post in workers.posts] == [2], "posted to old pods"

    await api.set_ready("m1", 2)
    await eventually(lambda: not api.pods("m1"), what="every old pod deleted")
    await api.set_ready("m1", 0)
    await eventually(
        lambda: old_key not in api.get(CM, NS, "m1-plan")["data"], what="old key dropped"
    )
    workers.plan = api.plan("m1")  # what the new leader loads from its mount
    await api.run_pods("m1", 2)
    await eventually(lambda: api.status("m1").get("phase") == "Running", what="Running again")
    assert plan_status(api)["appliedVersion"] >= 3  # the new shape's plan 3, or a rebalance


# --- item 4: never adopt what the operator did not create --------------------------------------


async def test_hostile_pre_existing_children_are_flagged_not_adopted(
    api: Api, operator: Operator
) -> None:
    await api.create(CM, NS, {"metadata": {"name": "m1-plan"}, "data": {"theirs": "keep me"}})
    attacker = base64.b64encode(b"attacker-chosen").decode()
    await api.create(SECRET, NS, {"metadata": {"name": "m1-control"}, "data": {"token": attacker}})
    await api.create(STS, NS, {"metadata": {"name": "m1"}, "spec": {"replicas": 1, "template": {}}})
    configmap, secret, statefulset = (
        api.get(CM, NS, "m1-plan"),
        api.get(SECRET, NS, "m1-control"),
        api.get(STS, NS, "m1"),
    )
    await api.create_moed("m1", small_spec())

    await eventually(
        lambda: api.condition("m1", "ChildrenOwned").get("status") == "False", what="flagged"
    )
    condition = api.condition("m1", "ChildrenOwned")
    assert condition["reason"] == "ChildConflict"
    for name in ("ConfigMap ns1/m1-plan", "Secret ns1/m1-control", "StatefulSet ns1/m1"):
        assert name in condition["message"], condition
    assert api.status("m1")["phase"] == "Failed"
    await eventually(lambda: "ChildConflict" in reasons(api), what="ChildConflict event")
    await timer_ran()
    # Never patched, deleted or extended; nothing created beside them.
    assert api.get(CM, NS, "m1-plan") == configmap
    assert api.get(SECRET, NS, "m1-control") == secret
    assert api.get(STS, NS, "m1") == statefulset
    assert api.get(SVC, NS, "m1-workers") is None
    for resource, name in ((CM, "m1-plan"), (SECRET, "m1-control"), (STS, "m1")):
        assert api.requests("patch", resource, NS, name) == []
        assert api.requests("delete", resource, NS, name) == []

    # Its owner removes them: the deployment proceeds with children of its own.
    for resource, name in ((CM, "m1-plan"), (SECRET, "m1-control"), (STS, "m1")):
        await api.delete(resource, NS, name)
    await eventually(
        lambda: api.condition("m1", "ChildrenOwned").get("status") == "True", what="resolved"
    )
    assert api.token("m1") != "attacker-chosen"
    assert api.plan("m1")["version"] == 1


async def test_look_alike_pods_are_never_scraped_nor_sent_the_token(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await api.create_moed("m1", small_spec(port=workers.port))
    await eventually(lambda: api.get(STS, NS, "m1"), what="StatefulSet")
    workers.token = api.token("m1")
    for rank in range(2):  # right names and labels, no controller reference
        pod = {
            "metadata": {
                "name": f"m1-{rank}",
                "labels": {"app.kubernetes.io/name": "moe-ep-worker", "moe-ep.io/deployment": "m1"},
            },
            "status": {"podIP": f"127.0.0.{rank + 1}"},
        }
        await api.create(PODS, NS, pod)
    await api.set_ready("m1", 2)
    await timer_ran(6)
    assert [len(handler) for handler in workers.handlers] == [0, 0]
    assert workers.posts == []


# --- item 5: the operator checks what the leader serves, not the version alone ----------------


async def test_a_forged_plan_of_the_desired_version_is_superseded(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await deploy(api, workers, rebalancing={"cooldownSeconds": 3600})
    await balanced_on(api, workers, 2)
    forged = {**workers.plan, "method": "Forged"}  # posted by someone who guessed the token
    workers.plan = forged

    await eventually(lambda: workers.version == 3, what="the operator's plan issued again")
    await eventually(lambda: "ForeignPlan" in reasons(api), what="ForeignPlan event")
    assert workers.plan["method"] != "Forged"
    assert parse_plan(api.plan("m1")).digest() == Plan.model_validate(workers.plan).digest()
    await balanced_on(api, workers, 3)
    assert plan_status(api)["digest"] == Plan.model_validate(workers.plan).digest()


# --- item 6: no error stops an object ---------------------------------------------------------


def errors(handler: str) -> float:
    return (
        REGISTRY.get_sample_value("moe_operator_reconcile_errors_total", {"handler": handler})
        or 0.0
    )


async def test_a_rejected_status_patch_does_not_stop_the_timer(
    api: Api, operator: Operator
) -> None:
    await api.create_moed("m1", small_spec())
    await eventually(lambda: api.status("m1").get("observedGeneration") == 1, what="status")
    before = errors("refresh")
    refused = Fault("patch", MOED, "m1", 422, subresource="status", times=6)
    api.server.faults.append(refused)
    await eventually(lambda: refused.times == 0, what="six status patches refused")
    assert errors("refresh") > before
    # Still handled: the next runs write status again (here: a changed spec shows up in it).
    await api.patch(MOED, NS, "m1", {"spec": {"worker": {"image": "example/moe:3"}}})
    await eventually(
        lambda: api.status("m1").get("observedGeneration") == 2, what="status after the faults"
    )
    await eventually(lambda: "ReconcileFailed" in reasons(api), what="ReconcileFailed event")
    await timer_ran()
    assert api.condition("m1", "Reconciled")["status"] == "True"
    assert operator.running


async def test_a_failing_api_call_is_reported_and_retried(api: Api, operator: Operator) -> None:
    await api.create_moed("m1", small_spec())
    await eventually(lambda: api.status("m1").get("observedGeneration") == 1, what="status")
    api.server.faults.append(Fault("get", CM, "m1-plan", 500))
    await eventually(
        lambda: api.condition("m1", "Reconciled").get("status") == "False", what="reported"
    )
    assert api.condition("m1", "Reconciled")["reason"] == "ReconcileError"
    api.server.faults.clear()
    await eventually(
        lambda: api.condition("m1", "Reconciled").get("status") == "True", what="recovered"
    )


# --- items 3, 5, 7: refused with the field named, nothing created ------------------------------


async def test_specs_kubernetes_or_the_operator_would_refuse_are_flagged(
    api: Api, operator: Operator
) -> None:
    cases = {
        "with.dots": ("metadata.name", small_spec()),
        "huge": (
            "spec.parallelism.expert",
            small_spec(
                model={"layers": 1024, "expertsPerLayer": 1024}, parallelism={"expert": 4096}
            ),
        ),
        "token-file": (
            "spec.worker.extraArgs[0]",
            small_spec(worker={"extraArgs": ["--token-file", "/etc/hostname"]}),
        ),
        "python-path": (
            "spec.worker.extraEnv",
            small_spec(worker={"extraEnv": [{"name": "PYTHONPATH", "value": "/tmp"}]}),
        ),
        "bad-quantity": (
            "spec.worker.resources.requests.memory",
            small_spec(worker={"resources": {"requests": {"memory": "lots"}}}),
        ),
    }
    for name, (_, spec) in cases.items():
        await api.create_moed(name, spec)
    for name, (field, _) in cases.items():
        await eventually(lambda name=name: api.status(name).get("phase") == "Failed", what=name)
        message = api.condition(name, "SpecValid")["message"]
        assert message.startswith(field) or f"; {field}" in message, message
    for resource in (SVC, STS, CM, SECRET):
        assert api.requests("post", resource, NS, "") == []


# --- item 8: what a restart or a delete must not lose or leave ----------------------------------


async def test_a_deleted_deployment_leaves_no_counter_series(
    api: Api, workers: Workers, operator: Operator
) -> None:
    await deploy(api, workers)
    await balanced_on(api, workers, 2)
    labels = {"namespace": NS, "moedeployment": "m1", "method": "Replace"}
    assert REGISTRY.get_sample_value("moe_rebalances_total", labels)
    await api.delete(MOED, NS, "m1")
    await eventually(lambda: api.get(MOED, NS, "m1") is None, what="deleted")
    assert REGISTRY.get_sample_value("moe_rebalances_total", labels) is None
