"""Rules the CRD's OpenAPI schema cannot express on Kubernetes 1.20 (no CEL there).

Pure: a spec dict (and the object's name) in, a list of problems out, each naming the field and
the fix. The schema has already checked types, ranges and enums when the object came through the
API server; parsing here repeats that so the operator is safe with objects written before a
schema change. Three families of rules:

- cross-field: the layout, the model and the worker settings must fit together;
- Kubernetes' own rules for what the children will carry (names, labels, env names,
  quantities): a spec the API server would refuse for a child never gets that far;
- bounds on products: one object within the schema's per-field limits must not make a plan
  larger than a ConfigMap holds, nor make the operator build one (its memory is shared by every
  deployment it manages).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moe_contract import env as worker_env
from moe_contract.plan import COMPACT_FROM_BYTES
from moe_contract.settings import USER_FLAGS, USER_SETTINGS
from moe_contract.shape import extra_problems
from moe_operator import kuberules
from moe_operator.api import SHAPE_EXTRA_FIELDS, MoEDeploymentSpec
from moe_operator.manifests import podspec

NAME_MAX = 52
"""Longest MoEDeployment name: the StatefulSet controller labels pods
`controller-revision-hash=<name>-<hash of up to 10 characters>`, a label value (<= 63)."""
GROUP_NAME_MAX = NAME_MAX - len("-g99")
"""Longest name of a deployment that may have more than one group (replicas + maxSurge > 1)."""
MAX_PLAN_BYTES = 480 * 1024
"""Largest plan document. A ConfigMap holds at most 1 MiB of data, and during a group restart
for a new shape it holds the old shape's plan and the new one."""
_FLOAT_BYTES = 25  # the longest JSON float ("-1.2345678901234567e-300") and its comma


@dataclass(frozen=True)
class SpecProblem:
    field: str
    message: str

    def __str__(self) -> str:
        where = self.field if self.field.startswith("metadata.") else f"spec.{self.field}"
        return f"{where}: {self.message}"


def parse_spec(
    raw: dict[str, Any], name: str | None = None
) -> tuple[MoEDeploymentSpec | None, list[SpecProblem]]:
    """Parse and check a spec (and the object's name, when given: the children carry it);
    returns the model only when there is no problem at all."""
    name_problems = name_problems_of(name) if name is not None else []
    try:
        spec = MoEDeploymentSpec.model_validate(raw)
    except ValidationError as error:
        return None, name_problems + [
            SpecProblem(".".join(str(part) for part in item["loc"]), item["msg"])
            for item in error.errors()
        ]
    problems = name_problems + cross_field_problems(spec) + kubernetes_problems(spec)
    if name is not None and not name_problems:
        problems += group_name_problems(name, spec)
    problems += size_problems(spec)
    return (spec if not problems else None), problems


def name_problems_of(name: str) -> list[SpecProblem]:
    """The name becomes the StatefulSet's, its pods' (`<name>-<rank>`) and the Service's prefix."""
    problem = kuberules.dns1035_label(name)
    if problem is None and len(name) <= NAME_MAX:
        return []
    return [
        SpecProblem(
            "metadata.name",
            f"{name[:80]!r} {problem or f'is longer than {NAME_MAX} characters'}; the children "
            f"are named after it (Services <name>-workers and <name>-api, pods <name>-<rank>, "
            f"the label controller-revision-hash=<name>-<hash>): create the deployment under a "
            f"name of at most {NAME_MAX} lowercase letters, digits and '-', starting with a letter",
        )
    ]


def cross_field_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """Every rule that spans fields, in the order a user would fix them."""
    model, layout, worker = spec.model, spec.parallelism, spec.worker
    problems: list[SpecProblem] = []
    need = _collector(problems)
    need(
        model.top_k <= model.experts_per_layer,
        "model.topK",
        f"topK {model.top_k} exceeds expertsPerLayer {model.experts_per_layer}; "
        "lower topK or add experts",
    )
    need(
        model.attention_heads % layout.tensor == 0,
        "parallelism.tensor",
        f"tensor {layout.tensor} must divide model.attentionHeads {model.attention_heads}",
    )
    need(
        model.ffn_hidden_size % layout.tensor == 0,
        "parallelism.tensor",
        f"tensor {layout.tensor} must divide model.ffnHiddenSize {model.ffn_hidden_size}",
    )
    need(
        model.layers % layout.pipeline == 0,
        "parallelism.pipeline",
        f"pipeline {layout.pipeline} must divide model.layers {model.layers}",
    )
    slots = layout.expert * spec.placement.slots_per_rank
    need(
        slots >= model.experts_per_layer,
        "placement.slotsPerRank",
        f"{layout.expert} expert ranks x {spec.placement.slots_per_rank} slots = {slots} "
        f"cannot hold {model.experts_per_layer} experts; raise slotsPerRank to "
        f"{-(-model.experts_per_layer // layout.expert)} or parallelism.expert",
    )
    need(
        layout.tensor == 1 and layout.pipeline == 1,
        "parallelism",
        "the serving runtime is expert-parallel only: set tensor 1 and pipeline 1 "
        "(the TP x PP layout exists for `moe-worker bench` comparisons)",
    )
    placement = spec.placement
    most = placement.most_slots_per_rank
    need(
        most >= placement.slots_per_rank,
        "placement.maxSlotsPerRank",
        f"maxSlotsPerRank {most} is below slotsPerRank {placement.slots_per_rank}; set it to at "
        "least slotsPerRank, or to 0 (the default: slotsPerRank)",
    )
    need(
        spec.rebalancing.method != "Replace" or layout.expert * most > model.experts_per_layer,
        "rebalancing.method",
        "Replace needs spare slots (parallelism.expert x placement.maxSlotsPerRank > "
        "model.expertsPerLayer); raise placement.maxSlotsPerRank if the GPUs have memory to "
        "spare (`moe-ep perf` prints what a slot costs), or use GatingBias or Auto",
    )
    need(
        worker.backend != "nccl" or worker.device == "cuda",
        "worker.backend",
        "nccl needs device cuda; use backend gloo for device cpu",
    )
    need(
        worker.device != "cuda" or worker.gpus_per_pod >= 1,
        "worker.gpusPerPod",
        "device cuda needs at least one GPU per pod; set gpusPerPod 1 or device cpu",
    )
    ranks = worker.local_ranks()
    need(
        layout.world_size % ranks == 0,
        "worker.ranksPerPod",
        f"world size {layout.world_size} (parallelism.expert) is not a multiple of {ranks} ranks "
        f"per pod (worker.ranksPerPod, by default gpusPerPod on cuda); make parallelism.expert a "
        f"multiple of it or set ranksPerPod to a divisor of {layout.world_size}",
    )
    need(
        worker.device != "cuda" or ranks <= worker.gpus_per_pod,
        "worker.ranksPerPod",
        f"{ranks} ranks per pod on device cuda need a GPU each, but gpusPerPod is "
        f"{worker.gpus_per_pod}; raise gpusPerPod or set ranksPerPod 0 (one rank per GPU)",
    )
    internal = range(worker.port + 1, worker.port + 1 + ranks) if ranks > 1 else range(0)
    taken = [p for p in (worker.master_port, worker.api_port) if p in internal]
    need(
        not taken,
        "worker.port",
        f"a pod of {ranks} ranks gives them ports {internal.start}..{internal.stop - 1} (port + 1 "
        f"+ local rank), which takes {', '.join(map(str, taken))} (masterPort or apiPort); "
        "choose ports apart",
    )
    need(
        worker.port != worker.master_port,
        "worker.masterPort",
        f"masterPort {worker.master_port} collides with port; choose another",
    )
    reserved = [env.name for env in worker.extra_env if worker_env.is_reserved_env(env.name)]
    need(
        not reserved,
        "worker.extraEnv",
        f"{', '.join(reserved)} are set by the operator or change what code the worker runs "
        f"(reserved: {', '.join(worker_env.RESERVED_ENV_PREFIXES)}* and "
        f"{', '.join(sorted(worker_env.RESERVED_ENV_NAMES))}); remove them",
    )
    problems += extra_args_problems(worker.extra_args)
    problems += replica_problems(spec)
    problems += prometheus_url_problems(spec)
    problems += serving_problems(spec)
    return problems


def replica_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """An update must be able to make progress: start a group above replicas, or take one out."""
    strategy = spec.update_strategy
    problems: list[SpecProblem] = []
    need = _collector(problems)
    need(
        strategy.max_surge + strategy.max_unavailable >= 1,
        "updateStrategy",
        "maxSurge and maxUnavailable are both 0: no group could ever be replaced; set maxSurge "
        "1 (start a new group first, the default) or maxUnavailable 1 (restart one in place)",
    )
    return problems


def group_name_problems(name: str, spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """Groups after the first are StatefulSets `<name>-g<k>` (k < 100): their revision label
    `<name>-g<k>-<hash>` must stay a label value."""
    if spec.replicas + spec.update_strategy.max_surge <= 1 or len(name) <= GROUP_NAME_MAX:
        return []
    return [
        SpecProblem(
            "metadata.name",
            f"{name[:80]!r} is longer than {GROUP_NAME_MAX} characters, too long for the "
            f"StatefulSets of groups after the first (<name>-g<k>, labelled "
            f"controller-revision-hash=<name>-g<k>-<hash>); use a shorter name, or replicas 1 "
            f"with updateStrategy.maxSurge 0",
        )
    ]


def serving_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """The model the workers serve (attention layout, weights source) and the API's settings."""
    model, worker = spec.model, spec.worker
    problems: list[SpecProblem] = []
    need = _collector(problems)
    need(
        model.key_value_heads == 0 or model.attention_heads % model.key_value_heads == 0,
        "model.keyValueHeads",
        f"keyValueHeads {model.key_value_heads} must divide attentionHeads "
        f"{model.attention_heads} (each key/value head serves a whole group of query heads); "
        f"use a divisor such as {_divisor_below(model.attention_heads, model.key_value_heads)}, "
        f"or 0 for as many as attentionHeads",
    )
    need(
        model.head_dim % 2 == 0 or model.kv_lora_rank > 0,
        "model.headDim",
        f"headDim {model.head_dim} must be even: rotary position embeddings turn pairs of "
        f"dimensions; use {model.head_dim + 1}",
    )
    problems += architecture_size_problems(spec)
    need(
        worker.api_port not in (worker.port, worker.master_port),
        "worker.apiPort",
        f"apiPort {worker.api_port} collides with port or masterPort; choose another "
        f"(default {worker_env.DEFAULT_API_PORT})",
    )
    keys = worker.api_keys
    if keys.secret_name:
        problem = kuberules.dns1123_subdomain(keys.secret_name)
        need(problem is None, "worker.apiKeys.secretName", f"{keys.secret_name!r} {problem}")
    problem = kuberules.config_key(keys.key)
    need(problem is None, "worker.apiKeys.key", f"{keys.key[:60]!r} {problem}")
    problems += source_problems(spec)
    return problems


def architecture_size_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """The sizes only some architectures have (dense layers, shared experts, latent attention):
    set where model.architecture has them and consistent (`moe_contract.shape.extra_problems`),
    each problem named by this API's field."""
    model = spec.model
    names = {shape: _camel(mine) for shape, mine in SHAPE_EXTRA_FIELDS.items()}
    names |= {"heads": "attentionHeads", "head_dim": "headDim", "kv_heads": "keyValueHeads"}
    found = extra_problems(
        model.architecture,
        model.attention_heads,
        model.head_dim,
        model.key_value_heads or None,
        model.extra_sizes(),
        names,
    )
    return [SpecProblem(f"model.{names[field]}", message) for field, message in found]


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def _divisor_below(heads: int, wanted: int) -> int:
    return max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(wanted, 1))


REFUSED_VOLUMES = {
    "emptyDir": "starts empty, so there is nothing to read",
    "configMap": "holds at most 1 MiB of API data, not model weights",
    "secret": "holds at most 1 MiB of API data, not model weights",
    "downwardAPI": "holds the pod's own metadata, not model weights",
    "projected": "holds API objects and tokens, not model weights",
    "gitRepo": "is deprecated and clones into the volume (it writes)",
}
"""core/v1 volume sources that cannot hold a checkpoint to read, and why."""
DATA_VOLUMES = frozenset(
    {
        "persistentVolumeClaim", "hostPath", "nfs", "csi", "ephemeral", "image", "iscsi",
        "cephfs", "rbd", "glusterfs", "fc", "flexVolume", "azureFile", "azureDisk",
        "gcePersistentDisk", "awsElasticBlockStore", "cinder", "portworxVolume", "quobyte",
        "storageos", "vsphereVolume", "photonPersistentDisk", "scaleIO", "flocker",
    }
)  # fmt: skip
"""core/v1 volume sources that hold data a worker can read a checkpoint from."""
HOST_PATH_TYPES = ("", "Directory")


def source_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """The weights: a checkpoint only with type Checkpoint, on one volume that holds data,
    mounted read-only, at a path inside the mount."""
    source = spec.model.source
    where = "model.source"
    if source.type == "Synthetic":
        if source.checkpoint is None:
            return []
        return [
            SpecProblem(
                f"{where}.type",
                "a checkpoint is given but type is Synthetic; set type Checkpoint to serve it, "
                "or remove checkpoint",
            )
        ]
    if source.checkpoint is None:
        return [
            SpecProblem(
                f"{where}.checkpoint",
                "type Checkpoint needs checkpoint: {volume: <a volume source, e.g. "
                "persistentVolumeClaim: {claimName: models}>, path: <directory in it>}",
            )
        ]
    return _volume_problems(source.checkpoint.volume.kinds()) + _path_problems(
        source.checkpoint.path
    )


def _volume_problems(kinds: dict[str, Any]) -> list[SpecProblem]:
    where = "model.source.checkpoint.volume"
    example = "e.g. persistentVolumeClaim: {claimName: models}"
    if not kinds:
        return [SpecProblem(where, f"name one volume source holding the checkpoint, {example}")]
    if len(kinds) > 1:
        return [SpecProblem(where, f"gives {len(kinds)} sources ({', '.join(kinds)}); keep one")]
    (kind, fields), problems = next(iter(kinds.items())), []
    need = _collector(problems)
    if kind in REFUSED_VOLUMES:
        return [
            SpecProblem(
                f"{where}.{kind}",
                f"{kind} {REFUSED_VOLUMES[kind]}: it cannot hold a checkpoint; use a "
                f"persistentVolumeClaim, hostPath, nfs or csi volume",
            )
        ]
    if kind not in DATA_VOLUMES:
        return [
            SpecProblem(
                where,
                f"{kind[:60]!r} is not a core/v1 volume source that holds data; use one of "
                f"{', '.join(sorted(DATA_VOLUMES))}",
            )
        ]
    if not isinstance(fields, dict):
        return [SpecProblem(f"{where}.{kind}", "must be an object, as in a pod's volumes[]")]
    need(
        fields.get("readOnly") is not False,
        f"{where}.{kind}.readOnly",
        "workers mount the checkpoint read-only; remove readOnly or set it true",
    )
    if kind == "persistentVolumeClaim":
        problem = kuberules.dns1123_subdomain(fields["claimName"])
        need(problem is None, f"{where}.{kind}.claimName", f"{fields['claimName']!r} {problem}")
    if kind == "hostPath":
        need(
            fields["path"].startswith("/"),
            f"{where}.hostPath.path",
            f"{fields['path'][:80]!r} must be an absolute path on the node",
        )
        need(
            fields.get("type", "") in HOST_PATH_TYPES,
            f"{where}.hostPath.type",
            f"{fields.get('type')!r}: a checkpoint is a directory that is read, never created; "
            f"use Directory (or leave type empty)",
        )
    return problems


def _path_problems(path: str) -> list[SpecProblem]:
    where = "model.source.checkpoint.path"
    mount = worker_env.CHECKPOINT_MOUNT_DIR
    parts = path.split("/")
    if ".." in parts or any(ord(char) < 32 for char in path):
        return [
            SpecProblem(
                where,
                f"{path[:80]!r} must stay inside the volume: no '..' and no control "
                f"characters; give the directory relative to the volume's root",
            )
        ]
    if path.startswith("/") and not (path == mount or path.startswith(mount + "/")):
        return [
            SpecProblem(
                where,
                f"{path[:80]!r} is outside the checkpoint's mount {mount}; give it relative to "
                f"the volume's root ({path.lstrip('/')[:60]!r}) or under {mount}/",
            )
        ]
    return []


def extra_args_problems(args: list[str]) -> list[SpecProblem]:
    """Only the worker flags a user may tune, each with a value the worker reads (its type and
    bounds, by the same reader: `Setting.read` of the contract's table); the operator sets the
    rest (the model shape, the world, the plan and token files), and an override of those
    breaks the group or its security (a guessable token file, a shape that does not fit the
    plan). A value the worker would refuse would crash-loop every pod: it is refused here."""
    allowed = ", ".join(sorted(USER_FLAGS))
    index = 0
    while index < len(args):
        flag, equals, value = args[index].partition("=")
        where = f"worker.extraArgs[{index}]"
        if flag not in USER_FLAGS:
            return [
                SpecProblem(
                    where,
                    f"{args[index][:60]!r} is not a flag users may set; the operator sets the "
                    f"others from the spec. Allowed: {allowed}, each with a value",
                )
            ]
        if not equals:
            if index + 1 >= len(args) or args[index + 1].startswith("--"):
                return [SpecProblem(where, f"{flag} needs a value: {flag} <value>")]
            index += 1
            value = args[index]
        try:
            USER_SETTINGS[flag].read(value)
        except ValueError as error:
            return [SpecProblem(f"worker.extraArgs[{index}]", f"{flag} {error}")]
        index += 1
    return []


def prometheus_url_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """The operator sends queries to this URL: http(s) to a host, nothing else (no file:, no
    credentials in the spec, no query of the user's own). PerLayer series leave Prometheus
    without the per-expert counters the operator would query."""
    if spec.metrics.expert_series == "PerLayer" and spec.metrics.source == "Prometheus":
        return [
            SpecProblem(
                "metrics.expertSeries",
                "PerLayer keeps the per-expert token counters out of Prometheus, where source "
                "Prometheus would read them; use source Direct, or expertSeries PerRank",
            )
        ]
    url = spec.metrics.prometheus_url
    if spec.metrics.source != "Prometheus" and not url:
        return []
    example = "e.g. http://prometheus.monitoring:9090"
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if (
        parts is None
        or not port_ok
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        return [
            SpecProblem(
                "metrics.prometheusUrl",
                f"source Prometheus needs an http:// or https:// URL of a host, without "
                f"credentials, query or fragment; {example}",
            )
        ]
    return []


def kubernetes_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """What the API server would refuse in the StatefulSet's pod template."""
    worker = spec.worker
    problems: list[SpecProblem] = []
    need = _collector(problems)
    for index, item in enumerate(worker.extra_env):
        problem = kuberules.env_name(item.name)
        need(problem is None, f"worker.extraEnv[{index}].name", f"{item.name!r} {problem}")
    for key, value in worker.node_selector.items():
        problem = kuberules.qualified_name(key)
        need(problem is None, "worker.nodeSelector", f"key {key!r}: {problem}")
        problem = kuberules.label_value(value)
        need(problem is None, f"worker.nodeSelector.{key}", f"value {value!r}: {problem}")
    for index, toleration in enumerate(worker.tolerations):
        where = f"worker.tolerations[{index}]"
        if toleration.key:
            problem = kuberules.qualified_name(toleration.key)
            need(problem is None, f"{where}.key", f"{toleration.key!r}: {problem}")
        problem = kuberules.label_value(toleration.value)
        need(problem is None, f"{where}.value", f"{toleration.value!r}: {problem}")
        need(
            toleration.operator != "Exists" or not toleration.value,
            f"{where}.value",
            "must be empty when operator is Exists",
        )
    problems += _resource_problems(spec)
    problems += pod_problems(spec)
    return problems


AFFINITY_KINDS = ("nodeAffinity", "podAffinity", "podAntiAffinity")
SPREAD_WHEN = ("DoNotSchedule", "ScheduleAnyway")
OPERATOR_LABEL_PREFIXES = ("app.kubernetes.io/", "moe-ep.io/", "statefulset.kubernetes.io/")


def pod_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """The NCCL-ready pod fields (manifests/podspec.py): GPU and extra resources, /dev/shm,
    socket interfaces. hostNetwork and ipcLock are allowed: they break the restricted Pod
    Security profile, which the API descriptions and docs/gpu-cluster.md say."""
    worker = spec.worker
    problems: list[SpecProblem] = []
    need = _collector(problems)
    gpu = worker.gpu_resource_name
    problem = kuberules.container_resource_name(gpu)
    need(
        problem is None and kuberules.is_extended_resource(gpu),
        "worker.gpuResourceName",
        f"{gpu!r} {problem or 'is not an extended resource'}: use a device plugin's name "
        "such as nvidia.com/gpu or amd.com/gpu",
    )
    for key, value in worker.extra_resources.items():
        where = f"worker.extraResources.{key}"
        problem = kuberules.container_resource_name(key)
        if problem is None and not kuberules.is_extended_resource(key):
            problem = "is not an extended resource (cpu and memory go in worker.resources)"
        if problem is None and key == gpu:
            problem = "is the GPU resource: set worker.gpusPerPod instead"
        if problem is not None:
            need(False, where, f"{key!r} {problem}")
            continue
        try:
            quantity = kuberules.parse_quantity(value)
        except ValueError as error:
            need(False, where, str(error))
            continue
        need(
            quantity > 0 and quantity.denominator == 1,
            where,
            f"{value!r}: an extended resource is a positive whole number",
        )
    if worker.shm.size_limit:
        try:
            size = kuberules.parse_quantity(worker.shm.size_limit)
        except ValueError as error:
            size = None
            need(False, "worker.shm.sizeLimit", str(error))
        need(
            size is None or size > 0,
            "worker.shm.sizeLimit",
            f"{worker.shm.size_limit!r} must be positive; leave it empty for no limit",
        )
    interface = worker.network.socket_interface
    need(
        not any(char.isspace() for char in interface),
        "worker.network.socketInterface",
        f"{interface!r} has whitespace: write interfaces comma-separated, e.g. eth0,eth1 or "
        "^lo,docker",
    )
    clashing = [env.name for env in worker.extra_env if env.name in podspec.SOCKET_ENV]
    need(
        not (interface and clashing),
        "worker.extraEnv",
        f"{', '.join(clashing)} are set from worker.network.socketInterface; remove them here",
    )
    problems += scheduling_problems(spec)
    return problems


def scheduling_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """worker.scheduling: what the pods carry must be what the API server accepts; the free-form
    Kubernetes types are checked as far as the operator relies on them."""
    scheduling = spec.worker.scheduling
    problems: list[SpecProblem] = []
    need = _collector(problems)
    where = "worker.scheduling"
    unknown = [key for key in scheduling.affinity if key not in AFFINITY_KINDS]
    need(
        not unknown,
        f"{where}.affinity",
        f"{', '.join(unknown)}: not a core/v1 Affinity field ({', '.join(AFFINITY_KINDS)})",
    )
    for key, value in scheduling.affinity.items():
        need(
            key in unknown or isinstance(value, dict),
            f"{where}.affinity.{key}",
            "must be an object",
        )
    for index, constraint in enumerate(scheduling.topology_spread_constraints):
        at = f"{where}.topologySpreadConstraints[{index}]"
        skew = constraint.get("maxSkew")
        need(
            isinstance(skew, int) and not isinstance(skew, bool) and skew >= 1,
            f"{at}.maxSkew",
            f"{skew!r}: a whole number >= 1 is required",
        )
        key = constraint.get("topologyKey")
        problem = kuberules.qualified_name(key) if isinstance(key, str) else "is required"
        need(problem is None, f"{at}.topologyKey", f"{key!r} {problem}")
        when = constraint.get("whenUnsatisfiable")
        need(
            when in SPREAD_WHEN,
            f"{at}.whenUnsatisfiable",
            f"{when!r}: one of {', '.join(SPREAD_WHEN)} is required",
        )
    for field, value in (
        ("priorityClassName", scheduling.priority_class_name),
        ("schedulerName", scheduling.scheduler_name),
    ):
        problem = kuberules.dns1123_subdomain(value) if value else None
        need(problem is None, f"{where}.{field}", f"{value!r} {problem}")
    gang = scheduling.gang
    need(
        gang.scheduler != "Kueue" or bool(gang.queue_name),
        f"{where}.gang.queueName",
        "Kueue admits a workload only through a LocalQueue: name it here",
    )
    for field, value in (("groupName", gang.group_name), ("queueName", gang.queue_name)):
        problem = kuberules.dns1123_subdomain(value) or kuberules.label_value(value)
        need(not value or problem is None, f"{where}.gang.{field}", f"{value!r} {problem}")
    for field, items in (
        ("podLabels", scheduling.pod_labels),
        ("podAnnotations", scheduling.pod_annotations),
    ):
        for key, value in items.items():
            problem = kuberules.qualified_name(key)
            need(problem is None, f"{where}.{field}", f"key {key!r}: {problem}")
            need(
                not key.startswith(OPERATOR_LABEL_PREFIXES),
                f"{where}.{field}",
                f"{key!r} is the operator's to set; choose a key of your own domain",
            )
            if field == "podLabels":
                problem = kuberules.label_value(value)
                need(problem is None, f"{where}.{field}.{key}", f"value {value!r}: {problem}")
    return problems


def _resource_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    worker = spec.worker
    problems: list[SpecProblem] = []
    need = _collector(problems)
    parsed: dict[str, dict[str, Any]] = {}
    for kind, values in (
        ("requests", worker.resources.requests),
        ("limits", worker.resources.limits),
    ):
        parsed[kind] = {}
        for key, value in values.items():
            where = f"worker.resources.{kind}"
            problem = kuberules.container_resource_name(key)
            if problem is not None:
                need(False, where, f"{key!r}: {problem}")
                continue
            if key == worker.gpu_resource_name and worker.gpus_per_pod:
                need(False, f"{where}.{key}", "is set from worker.gpusPerPod; remove it here")
                continue
            if key in worker.extra_resources:
                need(False, f"{where}.{key}", "is set from worker.extraResources; remove one")
                continue
            try:
                quantity = kuberules.parse_quantity(value)
            except ValueError as error:
                need(False, f"{where}.{key}", str(error))
                continue
            need(quantity >= 0, f"{where}.{key}", f"{value!r} must not be negative")
            if kuberules.is_extended_resource(key):
                need(
                    quantity.denominator == 1,
                    f"{where}.{key}",
                    f"{value!r}: extended resources are whole numbers",
                )
            parsed[kind][key] = quantity
    requests, limits = parsed["requests"], parsed["limits"]
    for key, request in requests.items():
        limit = limits.get(key)
        if kuberules.is_extended_resource(key):
            need(
                limit == request,
                f"worker.resources.limits.{key}",
                f"extended resource {key} needs a limit equal to its request",
            )
        elif limit is not None:
            need(
                request <= limit,
                f"worker.resources.requests.{key}",
                f"request {worker.resources.requests[key]} exceeds limit "
                f"{worker.resources.limits[key]}",
            )
    return problems


def plan_bytes_bound(spec: MoEDeploymentSpec) -> tuple[int, int]:
    """Upper bounds of the stored plan document's (slot table, gate bias) bytes, without
    building it.

    Plain JSON: slots [L][R][S], each entry at most the digits of E-1 and a comma, each list its
    brackets and comma; gateBias [L][E] (only a planner that may bias routing writes it): a float
    each. Above `COMPACT_FROM_BYTES` the ConfigMap stores the compact form instead
    (`Plan.to_stored_json`): 2 bytes a slot and 8 a bias, in base64 (4 characters for 3 bytes).
    """
    layers, experts = spec.model.layers, spec.model.experts_per_layer
    world, slots = spec.parallelism.world_size, spec.placement.most_slots_per_rank  # grown
    digits = len(str(max(experts - 1, 0)))
    table = layers * world * slots * (digits + 1) + layers * world * 3 + layers * 3 + 200
    bias = 0
    biased = spec.rebalancing.method != "Replace"
    if biased:
        bias = layers * experts * _FLOAT_BYTES + layers * 3 + 20
    if table + bias <= COMPACT_FROM_BYTES:
        return table, bias
    compact_table = 4 * math.ceil(layers * world * slots * 2 / 3) + 300
    compact_bias = 4 * math.ceil(layers * experts * 8 / 3) + 100 if biased else 0
    return compact_table, compact_bias


def size_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    table, bias = plan_bytes_bound(spec)
    if table + bias <= MAX_PLAN_BYTES:
        return []
    model, layout = spec.model, spec.parallelism
    if table >= bias:
        field = "parallelism.expert"
        what = (
            f"model.layers {model.layers} x world size {layout.world_size} x "
            f"{spec.placement.most_slots_per_rank} slots per rank (placement.maxSlotsPerRank)"
        )
        fix = (
            "lower model.layers, parallelism.expert, placement.slotsPerRank or "
            "placement.maxSlotsPerRank"
        )
    else:
        field = "model.expertsPerLayer"
        what = (
            f"model.layers {model.layers} x expertsPerLayer {model.experts_per_layer} gate biases"
        )
        fix = "lower model.layers or model.expertsPerLayer, or use rebalancing.method Replace"
    return [
        SpecProblem(
            field,
            f"the plan would hold {what}: up to {table + bias} bytes, over the {MAX_PLAN_BYTES} "
            f"a plan ConfigMap may carry; {fix}",
        )
    ]


def _collector(problems: list[SpecProblem]) -> Callable[[bool, str, str], None]:
    def need(condition: bool, field: str, message: str) -> None:
        if not condition:
            problems.append(SpecProblem(field, message))

    return need
