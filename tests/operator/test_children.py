"""Child builders: properties of the objects the operator creates (not snapshots)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract import env as worker_env
from moe_contract.plan import parse_plan, validate_plan
from moe_operator.api import MoEDeploymentSpec
from moe_operator.groups import naming
from moe_operator.manifests import children, router


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
    assert {port["name"] for port in container["ports"]} == {"metrics", "rendezvous", "api"}
    assert all(port["protocol"] == "TCP" for port in container["ports"])


def test_environment_carries_rank_source_world_master_and_plan_path() -> None:
    env = _env(children.build_statefulset("seed", "ml", _spec()))
    assert env[worker_env.POD_NAME] == "<ref>"  # rank = StatefulSet ordinal
    assert env[worker_env.WORLD_SIZE] == "16"
    assert env[worker_env.MASTER_ADDR] == "seed-0.seed-workers.ml.svc"
    assert env[worker_env.MASTER_PORT] == "29500"
    assert env[worker_env.PLAN_PATH] == "/etc/moe-ep/plan/plan.json"
    assert env[worker_env.BACKEND] == "nccl"


def test_pods_learn_their_ip_for_the_rendezvous_store_and_no_bind_address() -> None:
    """Issue 19, item 6: rank 0's store listens on the pod's IP (the downward API's), the HTTP
    servers on the pod's every address (the worker's default in a pod), never one the operator
    would have to guess."""
    sts = children.build_statefulset("seed", "ml", _spec())
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    (pod_ip,) = [item for item in env if item["name"] == worker_env.POD_IP]
    assert pod_ip == {
        "name": "MOE_POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    assert worker_env.BIND_ADDRESS not in {item["name"] for item in env}


def test_per_layer_series_label_the_pods_and_per_rank_leaves_the_template_alone() -> None:
    per_rank = children.build_statefulset("a", "ns", _spec())
    assert children.EXPERT_SERIES_LABEL not in per_rank["spec"]["template"]["metadata"]["labels"]
    per_layer = children.build_statefulset("a", "ns", _spec(metrics={"expertSeries": "PerLayer"}))
    labels = per_layer["spec"]["template"]["metadata"]["labels"]
    assert labels[children.EXPERT_SERIES_LABEL] == "PerLayer"
    assert children.EXPERT_SERIES_LABEL not in per_layer["spec"]["selector"]["matchLabels"]


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
        children.api_service_name(name),
        children.plan_configmap_name(name),
        children.token_secret_name(name),
    }
    assert len(names) == 4


def _container(spec: MoEDeploymentSpec) -> dict:
    return children.build_statefulset("m", "ml", spec)["spec"]["template"]["spec"]["containers"][0]


def _pod(spec: MoEDeploymentSpec) -> dict:
    return children.build_statefulset("m", "ml", spec)["spec"]["template"]["spec"]


HOST_CHECKPOINT = {
    "type": "Checkpoint",
    "checkpoint": {"volume": {"hostPath": {"path": "/srv/models"}}, "path": "mixtral-tiny"},
}
MIXTRAL = {
    "architecture": "Mixtral",
    "layers": 2,
    "expertsPerLayer": 8,
    "hiddenSize": 64,
    "ffnHiddenSize": 128,
    "attentionHeads": 4,
    "keyValueHeads": 2,
    "headDim": 16,
    "vocabSize": 256,
}


MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim")


def test_the_whole_model_shape_travels_to_the_workers() -> None:
    """Every field a checkpoint is checked against: the workers compare what the environment
    declares with config.json (architecture, GQA heads and vocabulary included)."""
    spec = _spec(model=MIXTRAL)
    env = _env(children.build_statefulset("m", "ml", spec))
    assert worker_env.shape_from_env(env) == spec.model.to_shape()
    optional = {"dense_layers", "dense_ffn_hidden", "shared_ffn_hidden", *MLA_FIELDS}
    assert worker_env.declared_shape_fields(env) == set(worker_env.SHAPE_VARIABLES) - optional
    assert (env[worker_env.ARCHITECTURE], env[worker_env.KV_HEADS]) == ("Mixtral", "2")
    assert env[worker_env.VOCAB_SIZE] == "256"
    plain = _env(children.build_statefulset("m", "ml", _spec()))
    assert plain[worker_env.KV_HEADS] == plain[worker_env.ATTENTION_HEADS] == "32"


def test_serving_settings_travel_through_the_workers_variables() -> None:
    spec = _spec(
        worker={"apiPort": 9000, "kvCacheTokens": 65536, "maxBatchTokens": 2048,
                "maxQueuedRequests": 7},
    )  # fmt: skip
    env = _env(children.build_statefulset("m", "ml", spec))
    assert env[worker_env.API_PORT] == "9000"
    assert env[worker_env.KV_CACHE_TOKENS] == "65536"
    assert env[worker_env.MAX_BATCH_TOKENS] == "2048"
    assert env[worker_env.MAX_QUEUED_REQUESTS] == "7"
    assert env[worker_env.SERVED_MODEL_NAME] == "m"  # synthetic: the deployment's name
    assert worker_env.CHECKPOINT not in env and worker_env.API_KEYS_PATH not in env
    api = next(port for port in _container(spec)["ports"] if port["name"] == "api")
    assert api == {"name": "api", "containerPort": 9000, "protocol": "TCP"}
    assert [v["name"] for v in _pod(spec)["volumes"]] == ["plan", "control", "dshm"]


def test_worker_settings_read_back_what_the_operator_set() -> None:
    """The operator's variables through the worker's own parser (the contract, both sides)."""
    from moe_worker.settings import settings_from_env

    spec = _spec(
        model={**MIXTRAL, "source": HOST_CHECKPOINT},
        worker={"kvCacheTokens": 4096, "apiKeys": {"secretName": "api-keys", "key": "list"}},
    )
    env = {**_env(children.build_statefulset("m", "ml", spec)), worker_env.POD_NAME: "m-3"}
    settings = settings_from_env(env)
    assert settings.rank == 3 and settings.model == spec.model.to_shape()
    assert settings.checkpoint == "/models/mixtral-tiny"
    assert settings.api_keys_path == "/etc/moe-ep/api-keys/keys"
    assert (settings.api_port, settings.kv_cache_tokens) == (8000, 4096)
    assert settings.served_model_name == "mixtral-tiny"
    assert settings.termination_message_path == _container(spec)["terminationMessagePath"]


@pytest.mark.parametrize(
    "volume",
    [
        {"persistentVolumeClaim": {"claimName": "models"}},
        {"hostPath": {"path": "/srv/models", "type": "Directory"}},
        {"nfs": {"server": "nas", "path": "/export/models"}},
        {"csi": {"driver": "blob.csi.azure.com", "volumeAttributes": {"containerName": "m"}}},
    ],
)
def test_the_checkpoint_volume_is_the_users_source_mounted_read_only(volume: dict) -> None:
    source = {"type": "Checkpoint", "checkpoint": {"volume": volume, "path": "/models/a/b"}}
    spec = _spec(model={"source": source})
    pod = _pod(spec)
    (checkpoint,) = [v for v in pod["volumes"] if v["name"] == "checkpoint"]
    kind = next(iter(volume))
    assert checkpoint.keys() == {"name", kind}
    assert checkpoint[kind].items() >= volume[kind].items()  # as written (plus readOnly)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "checkpoint")
    assert mount == {"name": "checkpoint", "mountPath": "/models", "readOnly": True}
    env = _env(children.build_statefulset("m", "ml", spec))
    assert env[worker_env.CHECKPOINT] == "/models/a/b"
    assert env[worker_env.SERVED_MODEL_NAME] == "b"


def test_api_keys_come_from_the_named_secret_as_a_read_only_file() -> None:
    spec = _spec(worker={"apiKeys": {"secretName": "clients", "key": "keys.txt"}})
    pod = _pod(spec)
    (keys,) = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert keys["secret"] == {
        "secretName": "clients",
        "items": [{"key": "keys.txt", "path": worker_env.API_KEYS_FILE_NAME}],
    }
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] and mount["mountPath"] == worker_env.API_KEYS_MOUNT_DIR
    env = _env(children.build_statefulset("m", "ml", spec))
    assert (
        env[worker_env.API_KEYS_PATH]
        == f"{mount['mountPath']}/{keys['secret']['items'][0]['path']}"
    )


def test_the_api_service_routes_to_the_leaders_that_take_traffic_then_the_router() -> None:
    spec = _spec(worker={"apiPort": 8001})
    service = children.build_api_service("m", spec)
    assert service["metadata"]["name"] == "m-api"
    assert service["spec"]["type"] == "ClusterIP"
    assert "publishNotReadyAddresses" not in service["spec"]  # ready endpoints only
    (port,) = service["spec"]["ports"]
    assert port == {"name": "http", "port": 8001, "targetPort": "api", "protocol": "TCP"}
    template = children.build_statefulset("m", "ml", spec)["spec"]["template"]
    leader = naming.pod_labels(0, leader=True, traffic=True)
    other = naming.pod_labels(0, leader=False, traffic=True)
    selector = {k: v for k, v in service["spec"]["selector"].items() if v is not None}
    # the leader's pod (labelled by the operator) matches; rank 1's does not
    assert selector.items() <= {**template["metadata"]["labels"], **leader}.items()
    assert not selector.items() <= {**template["metadata"]["labels"], **other}.items()
    # a single-group deployment's selector (pod 0 by name) is dropped by the merge patch
    assert service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] is None
    assert children.api_endpoint("m", "ml", spec) == "http://m-api.ml.svc:8001/v1"
    routed = children.build_api_service("m", spec, router_available=True)["spec"]
    assert {k: v for k, v in routed["selector"].items() if v} == router.router_selector("m")
    assert routed["ports"][0]["targetPort"] == "api"  # the router's port has that name too
    # merge-patched over each other (as the operator applies them), no stale key is left
    leaders = service["spec"]["selector"]

    def merged(old: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**old, **patch}.items() if v is not None}

    assert merged(merged({}, leaders), routed["selector"]) == router.router_selector("m")
    assert merged(merged({}, routed["selector"]), leaders) == naming.serving_leaders("m")


def test_a_fatal_start_up_error_reaches_the_pods_status() -> None:
    container = _container(_spec())
    assert container["terminationMessagePath"] == worker_env.TERMINATION_MESSAGE_FILE
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env[worker_env.TERMINATION_MESSAGE_PATH] == container["terminationMessagePath"]


@pytest.mark.parametrize(
    ("path", "name"),
    [("mixtral-8x7b", "mixtral-8x7b"), ("org/model/", "model"), ("", "m"), ("/models", "m")],
)
def test_the_served_model_is_named_after_the_checkpoint_directory(path: str, name: str) -> None:
    source = {
        "type": "Checkpoint",
        "checkpoint": {"volume": {"hostPath": {"path": "/x"}}, "path": path},
    }
    assert children.served_model_name("m", _spec(model={"source": source})) == name
    named = _spec(model={"source": source, "servedModelName": "prod-llm"})
    assert children.served_model_name("m", named) == "prod-llm"


def test_a_family_with_optional_sizes_declares_all_of_them_zeros_included() -> None:
    """A Qwen2-MoE pod declares its shared expert size and nothing of MLA or dense layers;
    a Mixtral pod declares none of them, so its template is the one it had before they existed."""
    qwen2 = {**MIXTRAL, "architecture": "Qwen2MoE", "sharedFfnHiddenSize": 0}
    env = _env(children.build_statefulset("m", "ml", _spec(model=qwen2)))
    assert env[worker_env.SHARED_FFN_HIDDEN_SIZE] == "0"
    assert worker_env.declared_shape_fields(env) == set(worker_env.SHAPE_VARIABLES) - {
        "dense_layers",
        "dense_ffn_hidden",
        *MLA_FIELDS,
    }
