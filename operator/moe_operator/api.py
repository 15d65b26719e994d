"""The MoEDeployment API (moe-ep.io/v1alpha1): the one source of truth for spec and status.

`crds/moedeployments.moe-ep.io.yaml` is generated from these models (`moe_operator.crd`), and a
test regenerates it to prove the two agree. Every field carries a description (it becomes
`kubectl explain` text) and every optional field a default (the API server applies it).
Field names are camelCase as in every Kubernetes API; Python code reads them as snake_case.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from moe_contract import env as worker_env
from moe_contract.plan import MAX_PLAN_VERSION
from moe_contract.settings import deployment_default as worker_default
from moe_contract.shape import ModelShape
from moe_operator.planning.detection import DetectionPolicy
from moe_operator.planning.gating import GatingOptions

GROUP = "moe-ep.io"
VERSION = "v1alpha1"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ("moed",)


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error, not a surprise."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class PersistentVolumeClaimSource(ApiModel):
    """A PersistentVolumeClaim of the deployment's namespace (core/v1 persistentVolumeClaim)."""

    claim_name: str = Field(
        min_length=1, max_length=253, description="Name of the PersistentVolumeClaim."
    )
    read_only: bool = Field(
        True, description="Workers mount the checkpoint read-only; false is refused."
    )


class HostPathSource(ApiModel):
    """A directory of the node (core/v1 hostPath): every node that runs a worker needs it."""

    path: str = Field(
        min_length=1, max_length=4096, description="Absolute path of the directory on the node."
    )
    type: str = Field(
        "",
        max_length=64,
        description="Directory (the kubelet checks it exists) or empty (no check). A "
        "checkpoint is read, never created: DirectoryOrCreate and the file, socket and device "
        "types are refused.",
    )


class NFSSource(ApiModel):
    """An NFS export (core/v1 nfs)."""

    server: str = Field(min_length=1, max_length=253, description="NFS server host or address.")
    path: str = Field(min_length=1, max_length=4096, description="Path exported by the server.")
    read_only: bool = Field(
        True, description="Workers mount the checkpoint read-only; false is refused."
    )


class VolumeSource(ApiModel):
    """Where a checkpoint lives: exactly one core/v1 volume source, written as in a pod's
    `volumes[]` entry without its name. persistentVolumeClaim, hostPath and nfs are checked
    here; any other source that holds data (csi, ephemeral, iscsi, cephfs, rbd, ...) is passed
    to the pods as written. Sources that hold no checkpoint are refused: emptyDir (empty),
    configMap, secret, downwardAPI and projected (small API objects), gitRepo (deprecated, writes).
    """

    # Every core/v1 source cannot be modelled here without copying the pod API: the known
    # ones are typed, the others kept as written (x-kubernetes-preserve-unknown-fields).
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="allow", frozen=True
    )

    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(
        None,
        description="A PersistentVolumeClaim holding the checkpoint (ReadOnlyMany or "
        "ReadWriteMany when workers run on several nodes).",
    )
    host_path: HostPathSource | None = Field(
        None, description="A directory on the node (single-node clusters, the local cluster)."
    )
    nfs: NFSSource | None = Field(None, description="An NFS export holding the checkpoint.")

    def kinds(self) -> dict[str, Any]:
        """Source kind -> its fields as written (camelCase), for every kind given."""
        written = self.model_dump(by_alias=True, exclude_none=True)
        return {
            # an empty string is "unset" in core/v1 (hostPath.type): leave it to the server
            kind: {k: v for k, v in fields.items() if v != ""}
            if isinstance(fields, dict)
            else fields
            for kind, fields in written.items()
        }


class CheckpointSource(ApiModel):
    """A Hugging Face checkpoint directory on a volume, mounted read-only into every worker."""

    volume: VolumeSource = Field(
        description=f"The volume holding the checkpoint, mounted read-only at "
        f"{worker_env.CHECKPOINT_MOUNT_DIR} in every worker."
    )
    path: str = Field(
        "",
        max_length=1024,
        description=f"The checkpoint directory (config.json, *.safetensors, optionally "
        f"tokenizer.json and generation_config.json) inside the volume: relative to its root, "
        f"or absolute under {worker_env.CHECKPOINT_MOUNT_DIR}; empty: the volume's root.",
    )

    def mounted_path(self) -> str:
        """The directory as workers see it, under the mount (the path must be valid)."""
        path, mount = self.path, worker_env.CHECKPOINT_MOUNT_DIR
        if path == mount or path.startswith(mount + "/"):  # absolute, under the mount
            path = path[len(mount) :]
        parts = [part for part in path.split("/") if part not in ("", ".")]
        return "/".join([worker_env.CHECKPOINT_MOUNT_DIR, *parts])


class ModelSource(ApiModel):
    """Where the weights come from."""

    type: Literal["Synthetic", "Checkpoint"] = Field(
        "Synthetic",
        description="Synthetic: seeded random weights of the model's shape, identical on every "
        "rank (no download, for tests and demos); Checkpoint: a Hugging Face directory on a "
        "volume (see checkpoint).",
    )
    checkpoint: CheckpointSource | None = Field(
        None, description="The checkpoint; required with type Checkpoint."
    )


class ModelSpec(ApiModel):
    """The MoE transformer every worker builds. With a checkpoint, its config.json must agree
    with every size here: a worker refuses one that does not, naming both values."""

    architecture: Literal["SeedMLP", "Mixtral", "Qwen3MoE", "Qwen2MoE", "Glm4MoE", "DeepseekV3"] = (
        Field(
            "SeedMLP",
            description="Model family: SeedMLP (the seed's two-matrix GELU experts), or SwiGLU "
            "experts from Hugging Face checkpoints: Mixtral (MixtralForCausalLM), Qwen3MoE "
            "(Qwen3MoeForCausalLM), Qwen2MoE (Qwen2MoeForCausalLM: a gated shared expert), "
            "Glm4MoE (Glm4MoeForCausalLM: dense first layers, shared experts, sigmoid router "
            "with its correction bias) and DeepseekV3 (DeepseekV3ForCausalLM, Kimi-K2 too: the "
            "same, under multi-head latent attention).",
        )
    )
    layers: int = Field(
        16,
        ge=1,
        le=1024,
        description="Transformer layers with an MoE block: the layers of plans, counters and "
        "gate biases (config.json's num_hidden_layers minus first_k_dense_replace).",
    )
    experts_per_layer: int = Field(16, ge=1, le=1024, description="Logical experts in every layer.")
    hidden_size: int = Field(4096, ge=1, le=65536, description="Token (model) dimension.")
    ffn_hidden_size: int = Field(
        16384, ge=1, le=262144, description="Hidden dimension of each expert MLP."
    )
    attention_heads: int = Field(32, ge=1, le=1024, description="Attention heads per layer.")
    key_value_heads: int = Field(
        0,
        ge=0,
        le=1024,
        description="Key/value heads (grouped-query attention, e.g. 8 for Mixtral-8x7B); must "
        "divide attentionHeads. 0: as many as attentionHeads.",
    )
    head_dim: int = Field(
        128, ge=1, le=1024, description="Dimension of each attention head (even: RoPE)."
    )
    top_k: int = Field(2, ge=1, le=64, description="Experts each token is routed to.")
    vocab_size: int = Field(
        32000, ge=1, le=4_194_304, description="Token vocabulary (embedding and LM head rows)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Weight and activation precision; checkpoint weights are cast to it.",
    )
    served_model_name: str = Field(
        "",
        max_length=256,
        description="The name clients send as `model`; empty: the checkpoint directory's "
        "name, or the MoEDeployment's name for synthetic weights.",
    )
    dense_layers: int = Field(
        0,
        ge=0,
        le=1024,
        description="Glm4MoE, DeepseekV3: leading layers with one dense MLP instead of experts "
        "(first_k_dense_replace), run by every worker; not counted in layers.",
    )
    dense_ffn_hidden_size: int = Field(
        0,
        ge=0,
        le=262144,
        description="Glm4MoE, DeepseekV3: hidden dimension of those dense MLPs "
        "(intermediate_size); 0 without dense layers.",
    )
    shared_ffn_hidden_size: int = Field(
        0,
        ge=0,
        le=262144,
        description="Qwen2MoE, Glm4MoE, DeepseekV3: hidden dimension of the shared expert MLP "
        "every token visits (n_shared_experts x moe_intermediate_size, or "
        "shared_expert_intermediate_size), held by every worker, never placed or counted; 0: "
        "none.",
    )
    kv_lora_rank: int = Field(
        0,
        ge=0,
        le=65536,
        description="DeepseekV3: the compressed key/value latent of multi-head latent "
        "attention; the KV cache holds it and the rotary key per token.",
    )
    q_lora_rank: int = Field(
        0,
        ge=0,
        le=65536,
        description="DeepseekV3: the query's low-rank width; 0: queries projected directly.",
    )
    rope_head_dim: int = Field(
        0,
        ge=0,
        le=1024,
        description="DeepseekV3: the rotary part of each query/key head (qk_rope_head_dim); "
        "headDim is the whole head (qk_nope_head_dim + qk_rope_head_dim).",
    )
    v_head_dim: int = Field(0, ge=0, le=1024, description="DeepseekV3: each value head's size.")
    source: ModelSource = Field(
        default_factory=ModelSource, description="Synthetic weights or a checkpoint."
    )

    def to_shape(self) -> ModelShape:
        """The shape workers build and the performance model prices (the one shared contract).

        Every field is declared, key/value heads included: a checkpoint must agree with all.
        """
        return ModelShape(
            layers=self.layers,
            experts=self.experts_per_layer,
            hidden=self.hidden_size,
            ffn_hidden=self.ffn_hidden_size,
            heads=self.attention_heads,
            head_dim=self.head_dim,
            top_k=self.top_k,
            dtype=self.dtype,
            architecture=self.architecture,
            kv_heads=self.key_value_heads or self.attention_heads,
            vocab_size=self.vocab_size,
            **self.extra_sizes(),
        )

    def extra_sizes(self) -> dict[str, int]:
        """The optional sizes, by their ModelShape names (`moe_contract.shape.EXTRA_FIELDS`)."""
        return {shape: getattr(self, mine) for shape, mine in SHAPE_EXTRA_FIELDS.items()}


SHAPE_EXTRA_FIELDS = {
    "dense_layers": "dense_layers",
    "dense_ffn_hidden": "dense_ffn_hidden_size",
    "shared_ffn_hidden": "shared_ffn_hidden_size",
    "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank",
    "rope_head_dim": "rope_head_dim",
    "v_head_dim": "v_head_dim",
}
"""ModelShape's optional sizes -> the ModelSpec fields that declare them."""


class ParallelismSpec(ApiModel):
    """Parallel layout; the world size (ranks, worker.ranksPerPod to a pod) is expert x tensor x
    pipeline."""

    expert: int = Field(
        16, ge=1, le=4096, description="Expert-parallel degree (ranks holding experts)."
    )
    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel degree.")
    pipeline: int = Field(
        1, ge=1, le=64, description="Pipeline-parallel degree (stages over layers)."
    )

    @property
    def world_size(self) -> int:
        return self.expert * self.tensor * self.pipeline


class PlacementSpec(ApiModel):
    """Expert slots: every deployment starts from the seed's round-robin placement (expert e of
    every layer on rank e % world) and the rebalancer re-places experts from measured load."""

    slots_per_rank: int = Field(
        worker_default("slots_per_rank"),
        ge=1,
        le=64,
        description="Expert slots per rank and layer at start; spare slots hold replicas.",
    )
    max_slots_per_rank: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Most expert slots per rank and layer the GPUs have memory for; 0 (the default) "
            "means slotsPerRank. Above slotsPerRank, rebalancing (Auto, Replace) may add slots "
            "online, replicating hot experts into them, which balances load without changing "
            "any output; each slot costs the weights of one expert of every layer on every GPU "
            "(`moe-ep perf` prints it). Workers refuse a plan that does not fit their memory."
        ),
    )

    @property
    def most_slots_per_rank(self) -> int:
        """maxSlotsPerRank, or slotsPerRank when it is 0 (not set)."""
        return self.max_slots_per_rank or self.slots_per_rank


# The rebalancing defaults are the planners' own (detection's policy, the gate-bias update), so
# a spec that says nothing gets what `moe-ep plan` and the planners' tests use.
_DETECTION = DetectionPolicy()
_GATING = GatingOptions()


class GatingSpec(ApiModel):
    """GatingBias: a per-layer bias on the gate probabilities for top-K selection only. It
    changes which experts some tokens visit, so it changes outputs: it acts only on tokens whose
    choice is close, the workers measure what it rerouted, and the operator keeps that under a
    cap. Rebalancing uses it only where no slot can be added (see placement.maxSlotsPerRank).
    Models with their own router bias (Glm4MoE, DeepseekV3: e_score_correction_bias) get it
    added to theirs, on their sigmoid scores."""

    max_margin: float = Field(
        _GATING.max_margin,
        ge=0.0,
        le=1.0,
        description=(
            "Guard: the bias acts only on tokens whose K-th and (K+1)-th gate probabilities are "
            "closer than this, and only between experts within half of it of that boundary, so "
            "a rerouted assignment loses less than this much gate probability; confident tokens "
            "keep the model's experts. 0 disables the bias, 1 lets it act on every token."
        ),
    )
    max_rerouted_fraction: float = Field(
        _GATING.max_rerouted_fraction,
        ge=0.0,
        le=1.0,
        description=(
            "Price cap: the largest fraction of a layer's top-K assignments the bias may send to "
            "another expert than the model's own choice, as the workers measure it; above it the "
            "operator shrinks that layer's bias. 1 means no cap."
        ),
    )
    rate: float = Field(
        _GATING.rate,
        ge=0.0,
        le=4.0,
        description=(
            "Step of the damped update per unit of relative load error, in units of the mean "
            "gate probability 1/expertsPerLayer: bias += rate/E x clip(1 - load/mean, -1, 1) x "
            "max(load/mean, 1/2), then damped, centred and bounded."
        ),
    )
    max_bias: float = Field(
        _GATING.max_bias,
        ge=0.0,
        le=1.0,
        description="Largest absolute bias any expert may get, in gate-probability units.",
    )
    damping: float = Field(
        _GATING.damping,
        ge=0.0,
        le=0.9,
        description=(
            "Fraction of the bias removed at every update: once load is balanced the bias "
            "decays to nothing and routing is the model's own again."
        ),
    )


class RebalancingSpec(ApiModel):
    """When and how the operator rebalances expert load."""

    enabled: bool = Field(True, description="Watch token load and rebalance when it is uneven.")
    method: Literal["Auto", "Replace", "GatingBias"] = Field(
        "Auto",
        description=(
            "Replace re-places and replicates experts, adding slots up to "
            "placement.maxSlotsPerRank (output-preserving); GatingBias biases top-K selection "
            "(changes which experts some tokens visit, see gating); Auto uses spare memory "
            "first: Replace wherever a slot is spare or can be added, GatingBias only where "
            "none can."
        ),
    )
    imbalance_threshold: float = Field(
        _DETECTION.threshold,
        ge=1.0,
        le=100.0,
        description="Act when max rank load / mean rank load exceeds this.",
    )
    evaluation_window_seconds: int = Field(
        60, ge=1, le=86400, description="Seconds of token counts each evaluation looks at."
    )
    consecutive_evaluations: int = Field(
        _DETECTION.consecutive,
        ge=1,
        le=100,
        description="Evaluations in a row above the threshold before acting.",
    )
    cooldown_seconds: int = Field(
        int(_DETECTION.cooldown_seconds),
        ge=0,
        le=86400,
        description="Minimum seconds between two rebalances.",
    )
    gating: GatingSpec = Field(
        default_factory=GatingSpec,
        description="GatingBias: its guard, price cap and update (used where no slot is spare).",
    )


class ResourceRequirements(ApiModel):
    """Compute resources of each worker container (GPUs are set by gpusPerPod)."""

    requests: dict[str, str] = Field(
        default_factory=dict, description="Minimum resources, e.g. cpu: '8', memory: 64Gi."
    )
    limits: dict[str, str] = Field(default_factory=dict, description="Maximum resources.")


class Toleration(ApiModel):
    """A pod toleration, as in core/v1."""

    key: str = Field("", description="Taint key the toleration applies to; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str = Field("", description="Taint value to match when operator is Equal.")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="Taint effect to match; empty matches all."
    )


class EnvVar(ApiModel):
    """An extra environment variable for the worker container."""

    name: str = Field(min_length=1, max_length=253, description="Variable name.")
    value: str = Field("", description="Variable value.")


class ApiKeysSpec(ApiModel):
    """API keys of the OpenAI-compatible API: a Secret's key holding one key per line, mounted
    read-only into the workers (read on every request: a rotated Secret needs no restart)."""

    secret_name: str = Field(
        "",
        max_length=253,
        description="Secret of the deployment's namespace holding the keys; empty: no key is "
        "needed (the API is open to whoever reaches the Service).",
    )
    key: str = Field(
        "keys",
        min_length=1,
        max_length=253,
        description="Key of the Secret whose value lists the accepted keys, one per line.",
    )


DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
IMAGE_USER = 65532
"""The images' user and group (images/Containerfile.*: USER 65532:65532)."""


class ShmSpec(ApiModel):
    """/dev/shm of each worker pod: a memory-backed emptyDir. NCCL's shared-memory transport,
    its proxies and torch's inter-process tensors live there; a container runtime's default
    (64 MiB) makes NCCL fail between the GPUs of one pod."""

    size_limit: str = Field(
        "8Gi",
        max_length=64,
        description="Most memory /dev/shm may hold (a quantity, e.g. 8Gi); it counts against "
        "the pod's memory. Empty: no limit beyond the pod's.",
    )


class NetworkSpec(ApiModel):
    """How ranks reach each other (NCCL between pods, gloo for the control collectives)."""

    socket_interface: str = Field(
        "",
        max_length=256,
        description="Network interface(s) for rank-to-rank sockets, set as NCCL_SOCKET_IFNAME "
        "and GLOO_SOCKET_IFNAME (e.g. eth0, or ^lo,docker to exclude). Empty: NCCL picks an "
        "interface itself and gloo uses the pod's hostname (the pod IP), which works on a "
        "plain pod network.",
    )
    host_network: bool = Field(
        False,
        description="Run the pods in the node's network namespace (RDMA/RoCE NICs without a "
        "CNI that exposes them). Breaks the baseline and restricted Pod Security profiles, "
        "and the ports must be free on every node.",
    )
    ipc_lock: bool = Field(
        False,
        description="Add the IPC_LOCK capability (RDMA registers pinned memory: InfiniBand, "
        "GPUDirect RDMA). Breaks the restricted Pod Security profile.",
    )


class SecuritySpec(ApiModel):
    """The user the worker runs as (the pod's securityContext also sets runAsNonRoot,
    seccompProfile RuntimeDefault, no privilege escalation and drops every capability)."""

    run_as_user: int = Field(
        IMAGE_USER,
        ge=1,
        le=2147483647,
        description="UID of the worker process: the images' user (65532) unless your image "
        "has another; root (0) is refused (runAsNonRoot).",
    )
    run_as_group: int = Field(
        IMAGE_USER, ge=0, le=2147483647, description="GID of the worker process (also fsGroup)."
    )


class GangSpec(ApiModel):
    """Gang scheduling: all world-size pods are placed together or not at all (a partial group
    holds GPUs and never serves). The scheduler's own object (a Volcano or scheduler-plugins
    PodGroup with minMember = world size) is created by you: docs/gpu-cluster.md shows it."""

    scheduler: Literal["None", "Volcano", "Kueue", "SchedulerPlugins"] = Field(
        "None",
        description="None: the default scheduler places pods one by one. Volcano: "
        "schedulerName volcano and the scheduling.k8s.io/group-name annotation. Kueue: the "
        "kueue.x-k8s.io/queue-name label (set queueName). SchedulerPlugins: the coscheduling "
        "plugin's scheduling.x-k8s.io/pod-group label and schedulerName "
        "scheduler-plugins-scheduler (override with scheduling.schedulerName).",
    )
    group_name: str = Field(
        "",
        max_length=63,
        description="Name of the pod group (Volcano, SchedulerPlugins); empty: the "
        "MoEDeployment's name.",
    )
    queue_name: str = Field(
        "",
        max_length=63,
        description="Queue: Kueue's LocalQueue (required with Kueue), or Volcano's queue "
        "(empty: its default).",
    )


class SchedulingSpec(ApiModel):
    """Where the pods may run, in which order, and with which scheduler."""

    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity), passed to "
        "the pods as written, e.g. GPU product or NVLink domain node affinity.",
    )
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list,
        description="core/v1 TopologySpreadConstraints, passed as written; without a "
        "labelSelector one selects this deployment's pods.",
    )
    priority_class_name: str = Field(
        "", max_length=253, description="PriorityClass of the pods; empty: the cluster default."
    )
    scheduler_name: str = Field(
        "",
        max_length=253,
        description="Scheduler of the pods; empty: the gang scheduler's (see gang), else the "
        "cluster default.",
    )
    gang: GangSpec = Field(
        default_factory=GangSpec, description="Gang-scheduling metadata for a batch scheduler."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on the pods (another scheduler's or a policy's); the "
        "operator's own labels win.",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the pods."
    )


class WorkerSpec(ApiModel):
    """The worker pods."""

    image: str = Field(
        "",
        description="Worker container image; empty means the operator's default worker image "
        "for the device (the chart's workerImage: its CPU or its CUDA build).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    gpus_per_pod: int = Field(
        1,
        ge=0,
        le=16,
        description="GPUs (gpuResourceName) requested by each pod; on device cuda each pod "
        "runs one rank per GPU (see ranksPerPod): EP16 on 8-GPU nodes is two pods of 8.",
    )
    ranks_per_pod: int = Field(
        0,
        ge=0,
        le=16,
        description="Rank processes in each pod (a local launcher starts them, as torchrun): "
        "rank = pod ordinal x ranksPerPod + local rank, so the ranks of one node talk over "
        "NVLink and pods over the network. 0 (default): gpusPerPod on device cuda, 1 on cpu. "
        "parallelism.expert must be a multiple of it; the pods are expert / ranksPerPod.",
    )
    stall_timeout_seconds: int = Field(
        worker_default("stall_timeout"),
        ge=5,
        le=3600,
        description="A rank whose serving loop makes no progress this long while it should (a "
        "hung collective, a stopped peer) fails its liveness probe (5 s apart, restarted after "
        "max(3, this / 10) failures; a pod that does not answer at all, after those alone); "
        "the operator then replaces the whole group. Above the longest step (a long prefill "
        "on a slow device).",
    )
    collective_timeout_seconds: int = Field(
        worker_default("collective_timeout"),
        ge=10,
        le=3600,
        description="How long a collective waits for a peer before it fails "
        "(init_process_group's timeout): a dead peer ends the group's loops, the pods exit and "
        "the group comes back. Joining and loading wait separately, up to 30 minutes.",
    )
    gpu_resource_name: str = Field(
        DEFAULT_GPU_RESOURCE,
        min_length=1,
        max_length=253,
        description="The extended resource a GPU is requested as: nvidia.com/gpu (NVIDIA "
        "device plugin), amd.com/gpu (AMD), or another device plugin's name.",
    )
    extra_resources: dict[str, str] = Field(
        default_factory=dict,
        description="More extended resources per pod, each set as request and limit, e.g. "
        "rdma/ib: '1' or nvidia.com/hostdev: '8' (RDMA NICs from a device plugin).",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU and memory of each worker."
    )
    backend: Literal["nccl", "gloo"] = Field(
        worker_default("backend"),
        description="torch.distributed backend: nccl on GPUs, gloo on CPUs.",
    )
    device: Literal["cuda", "cpu"] = Field(
        worker_default("device"), description="Device the worker computes on."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the pods tolerate (e.g. GPU nodes)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments for moe-worker serve."
    )
    extra_env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment variables (not MOE_* ones)."
    )
    port: int = Field(
        worker_default("http_port"),
        ge=1,
        le=65535,
        description="HTTP port: metrics, probes, plan API.",
    )
    master_port: int = Field(
        worker_default("master_port"),
        ge=1,
        le=65535,
        description="torch.distributed rendezvous port on rank 0.",
    )
    api_port: int = Field(
        worker_default("api_port"),
        ge=1,
        le=65535,
        description="Port of the OpenAI-compatible API (/v1/completions, /v1/models) on the "
        "leader (rank 0), behind the Service <name>-api.",
    )
    kv_cache_tokens: int = Field(
        worker_default("kv_cache_tokens"),
        ge=16,
        le=1 << 30,
        description="KV cache budget of each rank, in tokens (prompt + generated, all layers), "
        "allocated at start: layers x 2 x keyValueHeads x headDim x dtype bytes per token. "
        "Fits a small CPU model; on GPUs raise it to what the memory left after the weights "
        "holds (hundreds of thousands of tokens on an 80 GB GPU).",
    )
    max_batch_tokens: int = Field(
        worker_default("max_batch_tokens"),
        ge=1,
        le=1 << 20,
        description="New tokens each rank runs per step (decodes plus chunked prefill), also "
        "its most running sequences. Fits a CPU; on GPUs raise it to 2048-8192 for throughput.",
    )
    max_queued_requests: int = Field(
        worker_default("max_queued_requests"),
        ge=0,
        le=1 << 20,
        description="Requests waiting for a KV budget on the leader; beyond them the API "
        "answers 429. Raise it with kvCacheTokens when clients send bursts.",
    )
    api_keys: ApiKeysSpec = Field(
        default_factory=ApiKeysSpec, description="Optional API keys (a Secret) for the API."
    )
    shm: ShmSpec = Field(default_factory=ShmSpec, description="/dev/shm of each pod.")
    network: NetworkSpec = Field(
        default_factory=NetworkSpec, description="Rank-to-rank network: interfaces, host network."
    )
    security: SecuritySpec = Field(
        default_factory=SecuritySpec, description="The user and group the worker runs as."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec,
        description="Affinity, spread, priority, scheduler and gang scheduling.",
    )

    def local_ranks(self) -> int:
        """Ranks in each pod: ranksPerPod, or its default (a rank per GPU on cuda, 1 on cpu)."""
        if self.ranks_per_pod:
            return self.ranks_per_pod
        return max(1, self.gpus_per_pod) if self.device == "cuda" else 1


class MetricsSpec(ApiModel):
    """Where the operator reads per-expert token counters."""

    source: Literal["Direct", "Prometheus"] = Field(
        "Direct", description="Direct scrapes each worker's /metrics; Prometheus queries its API."
    )
    prometheus_url: str = Field(
        "", description="Base URL of the Prometheus HTTP API; required when source is Prometheus."
    )
    expert_series: Literal["PerRank", "PerLayer"] = Field(
        "PerRank",
        description=(
            "What Prometheus keeps of the workers' token counters. PerRank: a series per (rank, "
            "layer, expert the rank holds), L x R x S (18,560 for 58 layers on EP64 with 5 slots "
            "per rank). PerLayer: a series per (rank, layer), L x R (3,712); the per-expert "
            "series are dropped at scrape (the worker pods are labelled "
            "moe-ep.io/expert-series=PerLayer), the operator still reads them from the workers, "
            "so it needs source Direct. Changing it restarts the group (a pod template label)."
        ),
    )


class UpdateStrategySpec(ApiModel):
    """How replica groups are replaced when the pod template changes, counted in groups (as
    LeaderWorkerSet's rolling update): a new group is started before an old one is drained."""

    max_surge: int = Field(
        1,
        ge=0,
        le=16,
        description="Groups started above `replicas` during an update: a template change starts "
        "a new group, waits until it serves, then drains an old one (the router stops sending "
        "to it, requests in flight finish) and removes it, one group at a time. 0: an old group "
        "is drained and restarted in place (it serves nothing meanwhile).",
    )
    max_unavailable: int = Field(
        0,
        ge=0,
        le=16,
        description="Groups below `replicas` that may be out of service during an update or a "
        "scale-in; with maxSurge 0 it must be at least 1.",
    )


class RouterSpec(ApiModel):
    """The router in front of the groups: smg (the Shepherd Model Gateway) as the Deployment
    `<name>-router`, discovering the group leaders by label; `<name>-api` routes to it."""

    type: Literal["Smg", "None"] = Field(
        "Smg",
        description="Smg: the operator runs the router (2 replicas, its Role and "
        "ServiceAccount, a PodDisruptionBudget) and `<name>-api` routes to it; None: no "
        "router, `<name>-api` selects the leaders of the groups that take traffic (route "
        "yourself, e.g. with a Gateway API inference gateway).",
    )
    image: str = Field(
        "",
        max_length=512,
        description="Router image; empty: the operator's default (the chart's routerImage).",
    )
    policy: Literal["round_robin", "random", "power_of_two", "cache_aware", "least_load"] = Field(
        "round_robin",
        description="smg's load-balancing policy; power_of_two and least_load use the "
        "leaders' load figure (/v1/loads: waiting + running requests).",
    )
    replicas: int = Field(2, ge=1, le=16, description="Router pods.")
    port: int = Field(
        30000, ge=1, le=65535, description="The router's HTTP port (the API's target port)."
    )


class MoEDeploymentSpec(ApiModel):
    """A Mixture-of-Experts model served with expert parallelism."""

    model: ModelSpec = Field(
        default_factory=ModelSpec, description="The model: family, shape and weights."
    )
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Parallel layout."
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec, description="Initial expert placement."
    )
    rebalancing: RebalancingSpec = Field(
        default_factory=RebalancingSpec, description="Load-imbalance control."
    )
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="Worker pods.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Token-load source.")
    replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="Replica groups: each a whole gang of parallelism.expert ranks with its "
        "own StatefulSet, rendezvous and PodDisruptionBudget, serving the same model on the "
        "same plan behind the router. The scale subresource sets it (kubectl scale, a "
        "HorizontalPodAutoscaler).",
    )
    update_strategy: UpdateStrategySpec = Field(
        default_factory=UpdateStrategySpec,
        description="How groups are replaced on a template change (surge, then drain).",
    )
    router: RouterSpec = Field(
        default_factory=RouterSpec, description="The router in front of the groups."
    )

    @property
    def pods(self) -> int:
        """Worker pods (the StatefulSet's replicas): world size / ranks per pod."""
        return self.parallelism.world_size // self.worker.local_ranks()


Phase = Literal["Pending", "Deploying", "Running", "Rebalancing", "Degraded", "Failed"]
ConditionType = Literal[
    "Ready", "Progressing", "SpecValid", "ChildrenOwned", "Balanced", "Degraded", "LoadsRead"
]


class Condition(ApiModel):
    """A condition of the standard Kubernetes shape."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    type: str = Field(
        description=(
            "Ready, Progressing, SpecValid, ChildrenOwned, Balanced, Degraded, LoadsRead or "
            "Reconciled (False while the last handler run failed)."
        )
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details, naming the field and the fix.")
    last_transition_time: str = Field("", description="When status last changed (RFC 3339).")
    observed_generation: int = Field(0, description="The spec generation this was computed for.")


class PlanStatus(ApiModel):
    """The desired and the applied expert plan."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    version: int = Field(
        0, ge=0, le=MAX_PLAN_VERSION, description="Version of the desired plan (in the ConfigMap)."
    )
    applied_version: int = Field(
        0,
        ge=0,
        le=MAX_PLAN_VERSION,
        description="Version the workers serve; counted only when the leader's digest is ours.",
    )
    digest: str = Field("", description="SHA-256 of the desired plan's document (Plan.digest()).")
    method: str = Field("", description="Planner that produced the desired plan.")
    config_map: str = Field("", description="Name of the ConfigMap holding the plan.")
    config_map_key: str = Field(
        "", description="Key of the desired plan in that ConfigMap (one per model shape)."
    )


class RebalanceRecord(ApiModel):
    """What the last rebalance did."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    time: str = Field("", description="When the plan was decided (RFC 3339).")
    method: str = Field("", description="Replace or GatingBias.")
    from_version: int = Field(0, ge=0, le=MAX_PLAN_VERSION, description="Plan version before.")
    to_version: int = Field(0, ge=0, le=MAX_PLAN_VERSION, description="Plan version after.")
    imbalance_before: float = Field(0.0, description="Worst-layer imbalance before.")
    imbalance_after: float = Field(
        0.0, description="Worst-layer imbalance predicted from the same loads (Replace only)."
    )
    slots_moved: int = Field(0, description="Expert slots that changed rank.")
    predicted_throughput_gain: float = Field(
        1.0, description="Predicted throughput after / before, from the performance model."
    )
    estimated_move_seconds: float = Field(
        0.0, description="Predicted time to move the expert weights."
    )
    note: str = Field("", description="What the planner says about this plan.")
    cross_pod_before: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Predicted fraction of top-K assignments crossing pods before (plans with "
        "ranksPerPod only).",
    )
    cross_pod_after: float | None = Field(
        None, ge=0.0, le=1.0, description="The same for the new plan."
    )


class ReroutedStatus(ApiModel):
    """The measured price of the gate bias in the last window: per layer, the fraction of top-K
    assignments sent to another expert than the model's own choice (0 without a bias)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    max: float = Field(0.0, ge=0.0, le=1.0, description="The worst layer's rerouted fraction.")
    mean: float = Field(0.0, ge=0.0, le=1.0, description="The mean over the measured layers.")
    per_layer: list[float] = Field(
        default_factory=list,
        description="Rerouted fraction of each layer; -1 where some rank did not measure it.",
    )
    cap: float = Field(
        0.1, ge=0.0, le=1.0, description="rebalancing.gating.maxReroutedFraction (1: no cap)."
    )


class DetectionStatus(ApiModel):
    """What imbalance detection remembers between evaluations (survives operator restarts)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    above_count: int = Field(0, description="Evaluations in a row above the threshold.")
    last_rebalance_at: float | None = Field(
        None, description="When the last plan was issued (seconds since the epoch)."
    )
    desired_version: int | None = Field(
        None,
        ge=0,
        le=MAX_PLAN_VERSION,
        description="Deprecated: plan.version holds it. Read from an older operator's status "
        "(an upgrade keeps its versions), then removed.",
    )
    applied_version: int | None = Field(
        None,
        ge=0,
        le=MAX_PLAN_VERSION,
        description="Deprecated: plan.appliedVersion holds it. Read from an older operator's "
        "status, then removed.",
    )


class RecoveryStatus(ApiModel):
    """Whole-group replacements after rank failures, for their backoff (survives restarts)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    replacements: int = Field(
        0, ge=0, description="Whole-group replacements in a row (each within 10 min of the last)."
    )
    last_replaced_at: float | None = Field(
        None, description="When the last one ran (seconds since the epoch)."
    )


class RefusalStatus(ApiModel):
    """Workers refused to start (exit 2): held for the spec generation it was seen at."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    generation: int = Field(
        0, description="The spec generation refused; a new generation starts the workers again."
    )
    reason: str = Field(
        "", description="CheckpointMismatch, CheckpointInvalid or WorkerStartupFailed."
    )
    message: str = Field("", description="The lowest rank's termination message.")
    pods: list[str] = Field(default_factory=list, description="The pods that refused.")


class MembershipStatus(ApiModel):
    """The worker group's membership, as its leader reports it (GET /v1/group)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    epoch: int = Field(0, ge=0, description="Membership epoch: grows each time a rank is lost "
                       "or joins.")  # fmt: skip
    ranks: int = Field(0, ge=0, description="Ranks of the whole group.")
    live_ranks: list[int] = Field(default_factory=list, description="Ranks serving now.")
    lost_ranks: list[int] = Field(default_factory=list, description="Ranks out of the group.")
    joining_ranks: list[int] = Field(
        default_factory=list, description="Ranks back in the group, their experts on the way."
    )
    state: str = Field("Serving", description="Serving, Degraded, Rejoining or Regrouping.")
    resumed_requests: int = Field(
        0, ge=0, description="Requests resumed on another rank after theirs was lost."
    )


class RedundancyStatus(ApiModel):
    """How the plan of record takes the loss of a rank or a pod (worst layer)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    single_replica_experts: int = Field(
        0, ge=0, description="Experts held by one rank only, in the worst layer."
    )
    single_pod_experts: int = Field(
        0, ge=0, description="Experts whose every replica is in one pod, in the worst layer."
    )
    survives_pod_loss: bool = Field(
        False, description="Every expert stays served, without a move, when any one pod is lost."
    )


class ReplicaGroupStatus(ApiModel):
    """One replica group as the operator saw it in its last run."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    name: str = Field(description="The group's StatefulSet (group 0: the deployment's name).")
    index: int = Field(0, ge=0, description="The group's number (its label moe-ep.io/group).")
    phase: Literal[
        "Starting", "Serving", "Degraded", "Draining", "Outdated", "Restarting", "Failed"
    ] = Field(
        "Starting",
        description="Starting, Serving, Degraded (serves without some ranks), Draining, "
        "Outdated, Restarting, Failed.",
    )
    ready: str = Field("0/0", description="Ready pods / pods of the group.")
    served_plan_version: int = Field(
        0, ge=0, le=MAX_PLAN_VERSION, description="Plan version its leader serves (0: unknown)."
    )
    current: bool = Field(True, description="Its pod template is the spec's.")
    recovery: RecoveryStatus | None = Field(
        None, description="This group's whole-group replacements after rank failures (backoff)."
    )
    membership: MembershipStatus | None = Field(
        None, description="The group's membership, as its leader reports it (GET /v1/group)."
    )
    degraded: str = Field(
        "", description="RankLost or Rejoining while it serves without some of its ranks."
    )


class MoEDeploymentStatus(ApiModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    observed_generation: int = Field(0, description="Spec generation last reconciled.")
    phase: Phase = Field(
        "Pending", description="Pending, Deploying, Running, Rebalancing, Degraded, Failed."
    )
    workers: int = Field(0, description="Worker pods wanted (the world size).")
    ready_workers: int = Field(0, description="Worker pods ready.")
    ready: str = Field("0/0", description="readyWorkers/workers, for kubectl get.")
    imbalance: str = Field("", description="Worst-layer imbalance in the last window (max/mean).")
    rerouted_fraction: ReroutedStatus | None = Field(
        None, description="The gate bias's measured price in the last window (GatingBias)."
    )
    endpoint: str = Field(
        "",
        description="Base URL of the OpenAI-compatible API, http://<name>-api.<namespace>.svc:"
        "<apiPort>/v1; the Service has a ready endpoint only while the whole group serves.",
    )
    served_model_name: str = Field("", description="The `model` name clients send.")
    plan: PlanStatus = Field(default_factory=PlanStatus, description="Desired and applied plan.")
    last_rebalance: RebalanceRecord | None = Field(None, description="The last rebalance, if any.")
    detection: DetectionStatus | None = Field(None, description="Imbalance detection state.")
    recovery: RecoveryStatus | None = Field(
        None,
        description="Whole-group replacements after rank failures (their backoff): the last "
        "group replaced; each group's own count is in groups[].recovery.",
    )
    replicas: int = Field(
        0, description="Groups that exist, draining ones included (the scale subresource's)."
    )
    ready_replicas: int = Field(0, description="Groups whose whole gang serves.")
    label_selector: str = Field(
        "",
        description="Selector of the groups' leaders, one pod per group (the scale "
        "subresource's: an HPA's Pods metric averages per group).",
    )
    groups: list[ReplicaGroupStatus] = Field(
        default_factory=list, description="Each replica group: phase and served plan."
    )
    refusal: RefusalStatus | None = Field(
        None,
        description="Workers refused to start: the groups on the spec's pod template stay at "
        "0 pods (no crash loop) until the spec changes; outdated groups serve on.",
    )
    membership: MembershipStatus | None = Field(
        None,
        description="A worker group's membership (workers that survive a lost rank): the first "
        "group serving without some ranks, else group 0's; each group's is in groups[].",
    )
    redundancy: RedundancyStatus | None = Field(
        None, description="How the plan of record takes the loss of a rank or a pod."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
