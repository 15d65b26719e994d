"""The NCCL-ready pod spec and the gang's PodDisruptionBudget, built by pure code."""

from __future__ import annotations

from typing import Any

import pytest

from moe_operator.api import MoEDeploymentSpec
from moe_operator.manifests import children, podspec
from moe_operator.validation import parse_spec

GPU = {"backend": "nccl", "device": "cuda", "gpusPerPod": 8}
CPU = {"backend": "gloo", "device": "cpu", "gpusPerPod": 0}


def _spec(worker: dict[str, Any], **overrides: Any) -> MoEDeploymentSpec:
    raw = {"worker": {"image": "w:1", **worker}, **overrides}  # EP16 over 16 experts
    spec, problems = parse_spec(raw, "m")
    assert spec is not None, [str(problem) for problem in problems]
    return spec


def _problems(worker: dict[str, Any]) -> list[str]:
    raw = {"worker": {"image": "w:1", **CPU, **worker}}
    return [str(problem) for problem in parse_spec(raw, "m")[1]]


def _pod(spec: MoEDeploymentSpec) -> dict[str, Any]:
    return children.build_statefulset("m", "ml", spec)["spec"]["template"]["spec"]


def _container(spec: MoEDeploymentSpec) -> dict[str, Any]:
    return _pod(spec)["containers"][0]


def _env(spec: MoEDeploymentSpec) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in _container(spec)["env"]}


def test_dev_shm_is_a_memory_empty_dir_of_the_spec_size() -> None:
    pod = _pod(_spec({**GPU, "shm": {"sizeLimit": "32Gi"}}))
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
    default = _pod(_spec(GPU))["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in default
    unlimited = _pod(_spec({**GPU, "shm": {"sizeLimit": ""}}))["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in unlimited


def test_socket_interfaces_reach_nccl_and_gloo_only_when_set() -> None:
    env = _env(_spec({**GPU, "network": {"socketInterface": "ib0,eth0"}}))
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0,eth0"
    # Unset: NCCL's own detection and gloo's hostname (the local cluster's loopback pods too).
    assert not {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"} & set(_env(_spec(GPU)))


def test_user_nccl_env_still_comes_after_the_operators() -> None:
    spec = _spec({**GPU, "extraEnv": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]})
    names = [item["name"] for item in _container(spec)["env"]]
    assert names[-1] == "NCCL_IB_HCA"


def test_gpu_resource_name_and_extra_resources_are_requests_equal_to_limits() -> None:
    spec = _spec({**GPU, "gpuResourceName": "amd.com/gpu", "extraResources": {"rdma/ib": "1"}})
    resources = _container(spec)["resources"]
    wanted = {"amd.com/gpu": "8", "rdma/ib": "1"}
    assert resources["requests"] == resources["limits"] == wanted
    default = _container(_spec(GPU))["resources"]
    assert default["limits"] == {"nvidia.com/gpu": "8"}
    assert "resources" not in _container(_spec(CPU)) or not _container(_spec(CPU))["resources"]


def test_the_cpu_pod_passes_the_restricted_profile() -> None:
    pod = _pod(_spec(CPU))
    assert podspec.restricted_problems(pod) == []
    assert pod["automountServiceAccountToken"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == context["runAsGroup"] == 65532  # images/: USER 65532:65532
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]["securityContext"]
    assert container == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_the_restricted_check_catches_each_rule_it_knows() -> None:
    """The checker must be able to fail, or the test above proves nothing."""
    pod = _pod(_spec(CPU))
    breaks = {
        "hostNetwork": lambda p: p.update(hostNetwork=True),
        "allowPrivilegeEscalation": lambda p: p["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "drop ALL": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "runAsNonRoot": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "seccompProfile": lambda p: p["securityContext"].pop("seccompProfile"),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    }
    for rule, breaking in breaks.items():
        broken = _pod(_spec(CPU))
        breaking(broken)
        assert podspec.restricted_problems(broken), rule
    assert podspec.restricted_problems(pod) == []


def test_ipc_lock_and_host_network_are_allowed_and_break_restricted() -> None:
    spec = _spec({**GPU, "network": {"ipcLock": True, "hostNetwork": True}})
    pod = _pod(spec)
    assert pod["containers"][0]["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["IPC_LOCK"],
    }
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # rank 0's name still resolves
    problems = podspec.restricted_problems(pod)
    assert any("IPC_LOCK" in problem for problem in problems)
    assert any("hostNetwork" in problem for problem in problems)


def test_a_custom_image_user_is_honoured() -> None:
    pod = _pod(_spec({**CPU, "security": {"runAsUser": 1000, "runAsGroup": 100}}))
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"] == 100
    assert _problems({"security": {"runAsUser": 0}})  # root is refused


def test_scheduling_fields_pass_through_and_spread_selects_our_pods() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [
                        {"key": "nvidia.com/gpu.product", "operator": "In",
                         "values": ["NVIDIA-H100-80GB-HBM3"]}
                    ]}
                ]
            }
        }
    }  # fmt: skip
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
              "whenUnsatisfiable": "DoNotSchedule"}  # fmt: skip
    scheduling = {
        "affinity": affinity,
        "topologySpreadConstraints": [spread],
        "priorityClassName": "inference-high",
        "schedulerName": "my-scheduler",
    }
    pod = _pod(_spec({**GPU, "scheduling": scheduling}))
    assert pod["affinity"] == affinity
    assert pod["topologySpreadConstraints"] == [
        {"labelSelector": {"matchLabels": children.selector_labels("m")}, **spread}
    ]
    assert pod["priorityClassName"] == "inference-high"
    assert pod["schedulerName"] == "my-scheduler"
    plain = _pod(_spec(GPU))
    assert not {"affinity", "topologySpreadConstraints", "priorityClassName", "schedulerName"} & (
        set(plain)
    )


@pytest.mark.parametrize(
    ("gang", "scheduler", "labels", "annotations"),
    [
        (
            {"scheduler": "Volcano", "queueName": "gpu"},
            "volcano",
            {},
            {"scheduling.k8s.io/group-name": "m", "scheduling.volcano.sh/queue-name": "gpu"},
        ),
        (
            {"scheduler": "Kueue", "queueName": "gpu"},
            None,
            {"kueue.x-k8s.io/queue-name": "gpu"},
            {},
        ),
        (
            {"scheduler": "SchedulerPlugins", "groupName": "ep16"},
            "scheduler-plugins-scheduler",
            {"scheduling.x-k8s.io/pod-group": "ep16"},
            {},
        ),
    ],
)
def test_gang_metadata_for_each_batch_scheduler(
    gang: dict[str, str], scheduler: str | None, labels: dict[str, str], annotations: dict[str, str]
) -> None:
    statefulset = children.build_statefulset(
        "m", "ml", _spec({**GPU, "scheduling": {"gang": gang}})
    )
    template = statefulset["spec"]["template"]
    assert template["spec"].get("schedulerName") == scheduler
    assert labels.items() <= template["metadata"]["labels"].items()
    assert annotations.items() <= template["metadata"]["annotations"].items()
    if gang["scheduler"] == "Kueue":  # admitted through its owner
        assert statefulset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    # the operator's selector labels survive whatever the spec adds
    assert children.selector_labels("m").items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("api_version", ["policy/v1", "policy/v1beta1"])
def test_pdb_keeps_the_whole_gang(api_version: str) -> None:
    spec = _spec(GPU)
    pdb = children.build_pdb("m", spec, api_version)
    assert pdb["apiVersion"] == api_version and pdb["kind"] == "PodDisruptionBudget"
    # Every pod (EP16 = 2 pods of 8 ranks): one eviction breaks the group.
    assert pdb["spec"]["minAvailable"] == 2
    one_rank_pods = _spec({**GPU, "gpusPerPod": 1})
    assert children.build_pdb("m", one_rank_pods, api_version)["spec"]["minAvailable"] == 16
    # one group's pods, by the group label (PodDisruptionBudgets must not share a pod)
    group_0 = {**children.selector_labels("m"), "moe-ep.io/group": "0"}
    assert pdb["spec"]["selector"] == {"matchLabels": group_0}
    assert pdb["metadata"]["labels"] == children.worker_labels("m")
    second = children.build_pdb("m", spec, api_version, group=2)
    assert second["metadata"]["name"] == "m-g2"
    assert second["spec"]["selector"]["matchLabels"]["moe-ep.io/group"] == "2"


def test_pdb_api_version_follows_the_kubernetes_release() -> None:
    assert podspec.pdb_api_version_for("1.20") == "policy/v1beta1"
    assert podspec.pdb_api_version_for("v1.21.3") == "policy/v1"
    assert podspec.pdb_api_version_for("1.30") == "policy/v1"
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR"):
        podspec.pdb_api_version_for("latest")
    with pytest.raises(ValueError, match="apiVersion"):
        children.build_pdb("m", _spec(GPU), "policy/v2")


@pytest.mark.parametrize(
    ("worker", "field"),
    [
        ({"gpuResourceName": "gpu"}, "spec.worker.gpuResourceName"),
        ({"extraResources": {"rdma/ib": "0.5"}}, "spec.worker.extraResources.rdma/ib"),
        ({"extraResources": {"memory": "1Gi"}}, "spec.worker.extraResources.memory"),
        ({"shm": {"sizeLimit": "lots"}}, "spec.worker.shm.sizeLimit"),
        ({"network": {"socketInterface": "eth0, eth1"}}, "spec.worker.network.socketInterface"),
        (
            {
                "network": {"socketInterface": "eth0"},
                "extraEnv": [{"name": "NCCL_SOCKET_IFNAME", "value": "ib0"}],
            },
            "spec.worker.extraEnv",
        ),
        ({"scheduling": {"affinity": {"nodeAffinty": {}}}}, "spec.worker.scheduling.affinity"),
        (
            {"scheduling": {"topologySpreadConstraints": [{"maxSkew": 0}]}},
            "spec.worker.scheduling.topologySpreadConstraints[0].maxSkew",
        ),
        (
            {"scheduling": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "z"}]}},
            "spec.worker.scheduling.topologySpreadConstraints[0].whenUnsatisfiable",
        ),
        ({"scheduling": {"gang": {"scheduler": "Kueue"}}}, "spec.worker.scheduling.gang.queueName"),
        ({"scheduling": {"priorityClassName": "High"}}, "spec.worker.scheduling.priorityClassName"),
        (
            {"scheduling": {"podLabels": {"moe-ep.io/deployment": "x"}}},
            "spec.worker.scheduling.podLabels",
        ),
    ],
)
def test_pod_fields_the_api_server_would_refuse_are_named(
    worker: dict[str, Any], field: str
) -> None:
    problems = _problems(worker)
    assert any(problem.startswith(field + ":") for problem in problems), problems


@pytest.mark.parametrize(
    ("extra_args", "grace"),
    [
        ([], 30),  # the default 20 s drain: the grace pods always had (no group restart)
        (["--drain-timeout", "100"], 110),
        (["--seed", "3", "--drain-timeout=2.5"], 13),
    ],
)
def test_the_termination_grace_covers_the_drain(extra_args: list[str], grace: int) -> None:
    """SIGTERM drains for --drain-timeout, then the ranks stop: the kubelet's SIGKILL must not
    come first (issue 19, item 4)."""
    assert _pod(_spec({"extraArgs": extra_args}))["terminationGracePeriodSeconds"] == grace


def test_a_drain_timeout_out_of_bounds_is_refused_at_admission() -> None:
    problems = _problems({"extraArgs": ["--drain-timeout", "0"]})
    assert any("--drain-timeout" in problem and "must be > 0" in problem for problem in problems)
