"""The operator's create, update, resume and delete handlers, and invalid specs, against kmock.

The operator runs for real (kopf, the handlers, the official client); kmock is the API server.
No workers run here: the StatefulSet never reports ready pods, so the timer only keeps children
in shape and refreshes status.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from moe_kmock import (
    CM,
    DEPLOY,
    MOED,
    NS,
    PDB,
    PODS,
    ROLE,
    ROLEBINDING,
    SA,
    SECRET,
    STS,
    SVC,
    Api,
    Operator,
    eventually,
    small_spec,
    timer_ran,
)
from prometheus_client import REGISTRY

from moe_contract.plan import parse_plan, validate_plan
from moe_operator import handlers

CHILDREN = [
    (SVC, "m1-workers"),
    (SVC, "m1-api"),
    (STS, "m1"),
    (CM, "m1-plan"),
    (SECRET, "m1-control"),
    (PDB, "m1"),
    # the router in front of the groups (spec.router: Smg by default)
    (DEPLOY, "m1-router"),
    (SA, "m1-router"),
    (ROLE, "m1-router"),
    (ROLEBINDING, "m1-router"),
    (PDB, "m1-router"),
]


def env_of(statefulset: dict[str, Any]) -> dict[str, str]:
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container["env"]}


async def settled(api: Api, name: str = "m1", generation: int = 1) -> dict[str, Any]:
    """Wait until the operator has handled `generation` and recorded it (kopf's diff base)."""

    def done() -> bool:
        moed = api.moed(name)
        annotations = moed["metadata"].get("annotations") or {}
        return (moed.get("status") or {}).get(
            "observedGeneration"
        ) == generation and "moe-ep.io/last-handled-configuration" in annotations

    await eventually(done, what=f"{name} generation {generation} handled")
    return api.moed(name)


async def test_create_makes_children_owned_by_the_deployment(api: Api, operator: Operator) -> None:
    await api.create_moed("m1", small_spec())
    moed = await settled(api)
    uid = moed["metadata"]["uid"]

    for resource, name in CHILDREN:
        child = api.get(resource, NS, name)
        assert child is not None, f"{resource} {name} was not created"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "moe-ep.io/v1alpha1",
                "kind": "MoEDeployment",
                "name": "m1",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], name
    for resource in {resource for resource, _ in CHILDREN}:
        created = len([name for kind, name in CHILDREN if kind == resource])
        assert len(api.requests("post", resource, NS, "")) == created, f"{resource} created twice"

    service = api.get(SVC, NS, "m1-workers")
    assert service["spec"]["clusterIP"] == "None"
    api_service = api.get(SVC, NS, "m1-api")
    # the leaders that take traffic, until the router has an available pod
    assert api_service["spec"]["selector"] == {
        "moe-ep.io/deployment": "m1",
        "moe-ep.io/role": "leader",
        "moe-ep.io/traffic": "on",
    }
    assert api_service["spec"]["ports"][0]["port"] == 8000
    statefulset = api.get(STS, NS, "m1")
    assert statefulset["spec"]["replicas"] == 2  # expert 2 x tensor 1 x pipeline 1
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert statefulset["spec"]["serviceName"] == "m1-workers"
    env = env_of(statefulset)
    assert env["MOE_WORLD_SIZE"] == "2"
    assert env["MOE_MASTER_ADDR"] == "m1-0.m1-workers.ns1.svc"
    assert env["MOE_PLAN_PATH"].endswith("/plan.json")
    assert env["MOE_LAYERS"] == "2" and env["MOE_SLOTS_PER_RANK"] == "2"

    plan = parse_plan(api.plan("m1"))
    validate_plan(plan, num_layers=2, num_experts=4, world_size=2)
    assert plan.version == 1
    assert [list(map(list, layer)) for layer in plan.slots] == [[[0, 2], [1, 3]]] * 2
    token = api.token("m1")
    assert token and len(token) >= 32

    status = moed["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://m1-api.ns1.svc:8000/v1"
    assert status["servedModelName"] == "m1"
    assert status["phase"] in ("Pending", "Deploying")
    assert status["plan"]["version"] == 1 and status["plan"]["configMap"] == "m1-plan"
    assert api.condition("m1", "SpecValid")["status"] == "True"
    assert api.condition("m1", "Ready")["status"] == "False"
    await eventually(
        lambda: "Reconciled" in {event["reason"] for event in api.events(NS, "m1")},
        what="Reconciled event",
    )

    # kopf's own state lives under our API group, never kopf.zalando.org.
    metadata = moed["metadata"]
    assert metadata["finalizers"] == ["moe-ep.io/finalizer"]
    keys = [*metadata.get("annotations", {}), *metadata["finalizers"]]
    assert not [key for key in keys if "kopf.zalando.org" in key]


async def test_update_patches_children_and_keeps_the_token(api: Api, operator: Operator) -> None:
    in_place = {"maxSurge": 0, "maxUnavailable": 1}  # the group restarts in place
    await api.create_moed("m1", small_spec(updateStrategy=in_place))
    await settled(api)
    token = api.token("m1")

    # Image only: the StatefulSet changes, the plan still fits and stays at version 1.
    await api.patch(MOED, NS, "m1", {"spec": {"worker": {"image": "example/moe:2"}}})
    await settled(api, generation=2)

    def image() -> str:
        return api.get(STS, NS, "m1")["spec"]["template"]["spec"]["containers"][0]["image"]

    await eventually(lambda: image() == "example/moe:2", what="the group restarted in place")
    assert api.plan("m1")["version"] == 1

    # A new shape: the plan no longer fits; it is replaced by a higher version, never reused.
    await api.patch(MOED, NS, "m1", {"spec": {"model": {"layers": 4}}})
    await settled(api, generation=3)
    await eventually(lambda: env_of(api.get(STS, NS, "m1"))["MOE_LAYERS"] == "4", what="shape")
    plan = parse_plan(api.plan("m1"))
    validate_plan(plan, num_layers=4, num_experts=4, world_size=2)
    assert plan.version == 2
    assert api.status("m1")["plan"]["version"] == 2

    assert api.token("m1") == token
    assert api.requests("patch", SECRET, NS, "m1-control") == []
    assert len(api.requests("post", SECRET, NS, "")) == 1
    assert len(api.requests("post", STS, NS, "")) == 1  # patched in place, not recreated


async def test_resume_after_restart_recreates_nothing(api: Api, operator: Operator) -> None:
    await api.create_moed("m1", small_spec())
    await settled(api)
    token, plan = api.token("m1"), api.plan("m1")
    await operator.stop()
    seen = len(api.server)
    status_patches = len(api.requests("patch", MOED, NS, "m1"))

    await operator.start()
    # The resume handler (and the timer) have run once they write status again.
    await eventually(
        lambda: len(api.requests("patch", MOED, NS, "m1")) > status_patches + 1,
        what="status written by the restarted operator",
    )
    later = list(api.server)[seen:]
    writes = [
        request
        for request in later
        if request.method.value in ("POST", "PATCH", "PUT", "DELETE")
        and request.resource is not None
        and request.resource.plural in ("services", "statefulsets", "configmaps", "secrets")
    ]
    assert writes == [], [f"{request.method} {request.url}" for request in writes]
    assert api.token("m1") == token
    assert api.plan("m1") == plan
    assert api.status("m1")["plan"]["version"] == 1
    assert api.condition("m1", "SpecValid")["status"] == "True"


def _series(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": NS, "moedeployment": "m1"})


async def test_delete_is_not_blocked_and_forgets_metrics(api: Api, operator: Operator) -> None:
    await api.create_moed("m1", small_spec())
    await api.create_moed("witness", small_spec())  # its timer keeps running: a clock to wait on
    await settled(api)
    await eventually(lambda: _series("moe_workers_desired") == 2, what="metric series")

    await api.delete(MOED, NS, "m1")
    await eventually(lambda: api.get(MOED, NS, "m1") is None, what="deletion finished")
    seen = len(api.server)
    await timer_ran(4)  # the witness' timer ran: m1's would have too, had it survived

    assert _series("moe_workers_desired") is None
    assert _series("moe_plan_desired_version") is None
    later = [request for request in list(api.server)[seen:] if request.resource]
    assert [
        f"{request.method} {request.url}"
        for request in later
        if request.method.value != "GET"
        and request.resource.plural != "events"
        and (request.name or "").startswith("m1")
    ] == []
    assert operator.running


async def test_a_deletion_during_a_slow_refresh_ends_soon_after_it(
    api: Api, operator: Operator, monkeypatch: Any
) -> None:
    """kopf waits for a running timer before it lets go of the finalizer, and looked again only
    after 60 s by default: `kubectl delete` hung that long whenever a refresh was running."""
    inside, slow = threading.Event(), 3.0
    real_sync = handlers._sync

    def slow_sync(call: handlers.Call, base: dict[str, Any], *, control: bool) -> None:
        if control and call.name == "m1":  # and it writes nothing: no event wakes kopf early
            inside.set()
            time.sleep(slow)
            return
        real_sync(call, base, control=control)

    await api.create_moed("m1", small_spec())
    await settled(api)
    monkeypatch.setattr(handlers, "_sync", slow_sync)
    await eventually(inside.is_set, what="a refresh of m1 under way")
    await api.delete(MOED, NS, "m1")
    # The refresh returns within `slow` seconds; kopf's 60 s poll would overrun this wait.
    await eventually(lambda: api.get(MOED, NS, "m1") is None, 6 * slow, "deletion finished")
    assert operator.running


BAD_SPECS = {
    # cross-field: 2 ranks x 1 slot cannot hold 4 experts
    "few-slots": ("placement.slotsPerRank", {"placement": {"slotsPerRank": 1}}),
    # cross-field: tensor 3 divides neither 2 heads nor 16
    "bad-tensor": ("parallelism.tensor", {"parallelism": {"tensor": 3}}),
    # what the schema would reject, had the object been written before a schema change
    "bad-type": ("model.layers", {"model": {"layers": "many"}}),
    "top-k": ("model.topK", {"model": {"topK": 8}}),
}


async def test_invalid_specs_fail_alone_and_recover(api: Api, operator: Operator) -> None:
    for name, (_, overrides) in BAD_SPECS.items():
        await api.create_moed(name, small_spec(**overrides))
    await api.create_moed("m1", small_spec())

    for name, (field, _) in BAD_SPECS.items():
        await eventually(lambda name=name: api.status(name).get("phase") == "Failed", what=name)
        condition = api.condition(name, "SpecValid")
        assert condition["status"] == "False"
        assert f"spec.{field}" in condition["message"], condition
        assert api.status(name)["observedGeneration"] == 1
        await eventually(
            lambda name=name: "InvalidSpec" in {event["reason"] for event in api.events(NS, name)},
            what=f"InvalidSpec event about {name}",
        )
    await settled(api)  # the valid neighbour is reconciled as usual
    assert api.condition("m1", "SpecValid")["status"] == "True"

    created = {
        request.data["metadata"]["name"]
        for resource in (SVC, STS, CM, SECRET)
        for request in api.requests("post", resource, NS, "")
    }
    assert created == {"m1-workers", "m1-api", "m1", "m1-plan", "m1-control"}  # none for bad ones

    # Fixing the spec recovers with no other step.
    await api.patch(MOED, NS, "few-slots", {"spec": {"placement": {"slotsPerRank": 2}}})
    await settled(api, "few-slots", generation=2)
    assert api.condition("few-slots", "SpecValid")["status"] == "True"
    assert api.status("few-slots")["phase"] == "Deploying"
    assert api.get(STS, NS, "few-slots")["spec"]["replicas"] == 2
    assert api.plan("few-slots")["version"] == 1
    assert operator.running


async def test_a_valid_object_turned_invalid_keeps_its_children(
    api: Api, operator: Operator
) -> None:
    await api.create_moed("m1", small_spec())
    await settled(api)
    statefulset, plan = api.get(STS, NS, "m1"), api.plan("m1")
    seen = len(api.server)

    await api.patch(MOED, NS, "m1", {"spec": {"parallelism": {"pipeline": 3}}})
    await eventually(lambda: api.status("m1").get("phase") == "Failed", what="Failed")
    assert "spec.parallelism.pipeline" in api.condition("m1", "SpecValid")["message"]
    await timer_ran()  # the timer runs too: still nothing touched
    later = list(api.server)[seen:]
    assert [
        request
        for request in later
        if request.method.value != "GET"
        and request.resource is not None
        and request.resource.plural in ("services", "statefulsets", "configmaps", "secrets")
    ] == []
    assert api.get(STS, NS, "m1") == statefulset and api.plan("m1") == plan

    await api.patch(MOED, NS, "m1", {"spec": {"parallelism": {"pipeline": 1}}})
    await eventually(
        lambda: api.condition("m1", "SpecValid").get("status") == "True", what="recovered"
    )
    assert api.status("m1")["phase"] == "Deploying"
    assert operator.running


def _container(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    status = {"name": "worker", "ready": False, "restartCount": 3, "state": state}
    return {"containerStatuses": [{**status, **({"lastState": last} if last else {})}]}


async def test_workers_refusing_the_checkpoint_show_in_ready_and_one_event(
    api: Api, operator: Operator
) -> None:
    """The kubelet's view of workers that exit 2 naming a shape mismatch: Ready says why with
    both values, phase Failed, one Warning Event however many timer runs see it."""
    await api.create_moed("m1", small_spec())
    await settled(api)
    await api.run_pods("m1", 2)
    await api.set_ready("m1", 0)
    message = (
        "rank {}: the checkpoint does not match the model shape: layers: the MoEDeployment "
        "says 2, /models/tiny/config.json says 4"
    )
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    for rank in (0, 1):
        last = {"terminated": {"exitCode": 2, "message": message.format(rank)}}
        await api.patch(PODS, NS, f"m1-{rank}", {"status": _container(waiting, last)}, sub="status")

    def refused() -> bool:
        return api.condition("m1", "Ready").get("reason") == "CheckpointMismatch"

    await eventually(refused, what="Ready False with CheckpointMismatch")
    ready = api.condition("m1", "Ready")
    assert ready["status"] == "False"
    assert "2 of 2 workers refused to start" in ready["message"]
    assert "the MoEDeployment says 2" in ready["message"] and "says 4" in ready["message"]
    assert api.status("m1")["phase"] == "Failed"
    await timer_ran(4)
    warnings = [e for e in api.events(NS, "m1") if e["reason"] == "CheckpointMismatch"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "config.json says 4" in warnings[0]["message"]


async def test_a_damaged_checkpoint_is_refused_once_and_held_until_the_spec_changes(
    api: Api, operator: Operator
) -> None:
    """Issue 19, item 3: rank 0 refuses a truncated shard (exit 2, the file named), rank 1 dies
    of it (exit 1). Before: the operator replaced the group for rank 1's death, again and again
    (and the kubelet restarted rank 0 in between, the phase flipping Failed/Deploying). Now: no
    pod is deleted, the StatefulSet goes to 0 pods, Ready=False CheckpointInvalid with one
    Event, held while the old pods come and go; a new spec generation tries again."""
    await api.create_moed("m1", small_spec())
    await settled(api)
    await api.run_pods("m1", 2)
    await api.set_ready("m1", 0)
    shard = "/models/tiny/model-00002-of-00003.safetensors"
    message = (
        f"rank 0: the checkpoint is invalid: {shard}: truncated: its header places tensors up "
        "to byte 9216, 4600 bytes follow it"
    )
    refusal = {"terminated": {"exitCode": 2, "message": message}}
    await api.patch(PODS, NS, "m1-0", {"status": _container(refusal)}, sub="status")
    death = {"terminated": {"exitCode": 1, "message": "rendezvous: connection refused"}}
    await api.patch(PODS, NS, "m1-1", {"status": _container(death)}, sub="status")

    def held() -> bool:
        return api.get(STS, NS, "m1")["spec"]["replicas"] == 0

    def said() -> bool:  # the run that scales to 0 writes status just after
        return api.condition("m1", "Ready").get("reason") == "CheckpointInvalid"

    await eventually(lambda: held() and said(), what="scaled to 0, Ready CheckpointInvalid")
    ready = api.condition("m1", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CheckpointInvalid"), ready
    assert shard in ready["message"] and "truncated" in ready["message"]
    assert api.status("m1")["refusal"]["generation"] == 1
    # The kubelet restarts rank 0 once more before the pods go: still held, still Failed.
    running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    await api.patch(PODS, NS, "m1-0", {"status": _container(running)}, sub="status")
    await timer_ran(4)
    assert api.status("m1")["phase"] == "Failed" and held()
    assert api.condition("m1", "Ready")["reason"] == "CheckpointInvalid"
    assert api.requests("delete", PODS, NS, "m1-0") == []  # no replacement, no loop
    assert api.requests("delete", PODS, NS, "m1-1") == []
    warnings = [e for e in api.events(NS, "m1") if e["reason"] == "CheckpointInvalid"]
    assert len(warnings) == 1 and shard in warnings[0]["message"], warnings
    assert [e for e in api.events(NS, "m1") if e["reason"] == "GroupRecovering"] == []

    await api.patch(PODS, NS, "m1-1", {"status": _container(running)}, sub="status")
    await api.patch(MOED, NS, "m1", {"spec": {"rebalancing": {"imbalanceThreshold": 1.5}}})
    await eventually(lambda: not held(), what="2 pods again for the new generation")
    await settled(api, generation=2)
    assert api.get(STS, NS, "m1")["spec"]["replicas"] == 2
    assert "refusal" not in api.status("m1")
    assert api.condition("m1", "Ready").get("reason") != "CheckpointInvalid"
