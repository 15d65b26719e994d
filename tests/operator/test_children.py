"""Child builders: properties of the objects the operator creates (not snapshots)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_operator.api import MoEDeploymentSpec
from moe_operator.manifests import children
from moe_worker import env as worker_env
from moe_worker.plan import parse_plan, validate_plan


def _spec(**overrides: object) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(overrides)


def initial_plan(spec: MoEDeploymentSpec):  # type: ignore[no-untyped-def]
    return children.plan_shape(spec).round_robin(1)


def _env(statefulset: dict) -> dict[str, str]:
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "<ref>") for item in container["env"]}


def test_statefulset_runs_world_size_ranks_in_parallel_with_gpus() -> None:
    sts = children.build_statefulset("seed", "ml", _spec())
    assert sts["spec"]["replicas"] == 16
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "seed-workers"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {port["name"] for port in container["ports"]} == {"metrics", "rendezvous"}
    assert all(port["protocol"] == "TCP" for port in container["ports"])


def test_environment_carries_rank_source_world_master_and_plan_path() -> None:
    env = _env(children.build_statefulset("seed", "ml", _spec()))
    assert env[worker_env.POD_NAME] == "<ref>"  # rank = StatefulSet ordinal
    assert env[worker_env.WORLD_SIZE] == "16"
    assert env[worker_env.MASTER_ADDR] == "seed-0.seed-workers.ml.svc"
    assert env[worker_env.MASTER_PORT] == "29500"
    assert env[worker_env.PLAN_PATH] == "/etc/moe-ep/plan/plan.json"
    assert env[worker_env.BACKEND] == "nccl"


def test_selector_matches_template_and_service_selects_the_pods() -> None:
    sts = children.build_statefulset("a", "ns", _spec())
    svc = children.build_service("a", _spec())
    template_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    assert svc["spec"]["selector"].items() <= template_labels.items()
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]


def test_cpu_workers_request_no_gpu() -> None:
    spec = _spec(
        worker={
            "backend": "gloo",
            "device": "cpu",
            "gpusPerPod": 0,
            "resources": {"requests": {"cpu": "1"}},
        }
    )
    resources = children.build_statefulset("a", "ns", spec)["spec"]["template"]["spec"][
        "containers"
    ][0]["resources"]
    assert resources == {"requests": {"cpu": "1"}}


def test_token_is_random_and_only_in_the_secret() -> None:
    first, second = children.build_token_secret("a"), children.build_token_secret("a")
    token = first["stringData"]["token"]
    assert token != second["stringData"]["token"] and len(token) >= 32
    sts = children.build_statefulset("a", "ns", _spec())
    assert token not in json.dumps(sts)


def test_plan_configmap_holds_a_plan_the_workers_accept() -> None:
    spec = _spec()
    key = children.plan_shape(spec).key
    configmap = children.build_plan_configmap("a", {key: initial_plan(spec)})
    plan = parse_plan(configmap["data"][key])
    validate_plan(plan, num_layers=16, num_experts=16, world_size=16)
    assert plan.slots[5][3] == (3,)  # seed 5.1: expert e on rank e % world


@settings(max_examples=50)
@given(
    layers=st.integers(1, 8),
    ranks=st.integers(1, 8),
    slots=st.integers(1, 3),
    experts=st.integers(1, 24),
)
def test_initial_plan_places_every_expert(
    layers: int, ranks: int, slots: int, experts: int
) -> None:
    if ranks * slots < experts:
        return
    spec = _spec(
        model={"layers": layers, "expertsPerLayer": experts, "topK": 1},
        parallelism={"expert": ranks},
        placement={"slotsPerRank": slots},
    )
    plan = initial_plan(spec)
    validate_plan(plan, num_layers=layers, num_experts=experts, world_size=ranks)


def test_the_group_is_replaced_by_the_operator_not_rolled_pod_by_pod() -> None:
    sts = children.build_statefulset("a", "ns", _spec())
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert sts["spec"]["updateStrategy"]["rollingUpdate"] is None  # cleared on old objects


def test_pods_read_their_own_shapes_plan() -> None:
    """A new shape's pods map the new key; an old template's pods keep mapping the old one."""
    small, large = _spec(), _spec(model={"layers": 8})
    keys = []
    for spec in (small, large):
        pod = children.build_statefulset("a", "ns", spec)["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "plan")["configMap"]
        assert volume["name"] == "a-plan"
        assert volume["items"] == [{"key": children.plan_shape(spec).key, "path": "plan.json"}]
        keys.append(volume["items"][0]["key"])
    assert keys[0] != keys[1] and "L8" in keys[1]


def test_only_a_controller_reference_with_our_uid_makes_a_child_ours() -> None:
    ours = {"metadata": {"ownerReferences": [{"uid": "u1", "controller": True}]}}
    assert children.controlled_by(ours, "u1")
    assert not children.controlled_by(ours, "u2")
    assert not children.controlled_by({"metadata": {}}, "u1")
    assert not children.controlled_by(None, "u1")
    not_controller = {"metadata": {"ownerReferences": [{"uid": "u1", "controller": False}]}}
    assert not children.controlled_by(not_controller, "u1")


@pytest.mark.parametrize("name", ["a", "seed-ep16", "x" * 40])
def test_child_names_are_derived_and_distinct(name: str) -> None:
    names = {
        children.service_name(name),
        children.plan_configmap_name(name),
        children.token_secret_name(name),
    }
    assert len(names) == 3
