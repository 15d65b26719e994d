"""The pod environment: the variables and paths the operator sets on worker pods.

Part of the operator -> worker contract (with `moe_contract.plan` and `moe_contract.shape`). The
operator's StatefulSet builder and the worker's settings parser both use this module, so names,
the way the model shape travels and the rank of a pod cannot drift between them. What each
setting's variable means, its default and who sets it: the table of `moe_contract.settings`.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping

from moe_contract.shape import EXTRA_FIELDS, ModelShape

# Identity and process group.
POD_NAME = "MOE_POD_NAME"  # the StatefulSet ordinal is the suffix after the last '-'
RANKS_PER_POD = "MOE_RANKS_PER_POD"  # rank processes per pod (one per GPU); absent: 1
RANK = "MOE_RANK"  # the rank of this process; absent: the first of its pod, ordinal x RANKS_PER_POD
LOCAL_RANK = "MOE_LOCAL_RANK"  # index among the ranks of one machine or pod: picks its GPU
WORLD_SIZE = "MOE_WORLD_SIZE"
MASTER_ADDR = "MOE_MASTER_ADDR"  # DNS name of rank 0 through the headless Service
MASTER_PORT = "MOE_MASTER_PORT"
BACKEND = "MOE_BACKEND"  # nccl | gloo
DEVICE = "MOE_DEVICE"  # cuda | cpu

# Parallel layout (world size = expert x tensor x pipeline).
EXPERT_PARALLEL = "MOE_EXPERT_PARALLEL"
TENSOR_PARALLEL = "MOE_TENSOR_PARALLEL"
PIPELINE_PARALLEL = "MOE_PIPELINE_PARALLEL"

# Model shape (see SHAPE_VARIABLES).
ARCHITECTURE = "MOE_ARCHITECTURE"
LAYERS = "MOE_LAYERS"
EXPERTS_PER_LAYER = "MOE_EXPERTS_PER_LAYER"
HIDDEN_SIZE = "MOE_HIDDEN_SIZE"
FFN_HIDDEN_SIZE = "MOE_FFN_HIDDEN_SIZE"
ATTENTION_HEADS = "MOE_ATTENTION_HEADS"
HEAD_DIM = "MOE_HEAD_DIM"
TOP_K = "MOE_TOP_K"
DTYPE = "MOE_DTYPE"  # bfloat16 | float16 | float32
KV_HEADS = "MOE_KV_HEADS"  # absent: as many as ATTENTION_HEADS
VOCAB_SIZE = "MOE_VOCAB_SIZE"
DENSE_LAYERS = "MOE_DENSE_LAYERS"  # leading dense-MLP blocks (GLM-4.5, DeepSeek-V3)
DENSE_FFN_HIDDEN_SIZE = "MOE_DENSE_FFN_HIDDEN_SIZE"
SHARED_FFN_HIDDEN_SIZE = "MOE_SHARED_FFN_HIDDEN_SIZE"  # the shared expert(s); 0: none
KV_LORA_RANK = "MOE_KV_LORA_RANK"  # multi-head latent attention (DeepSeek-V3); 0: none
Q_LORA_RANK = "MOE_Q_LORA_RANK"
ROPE_HEAD_DIM = "MOE_ROPE_HEAD_DIM"
V_HEAD_DIM = "MOE_V_HEAD_DIM"
SLOTS_PER_RANK = "MOE_SLOTS_PER_RANK"
MAX_SLOTS_PER_RANK = "MOE_MAX_SLOTS_PER_RANK"  # placement.maxSlotsPerRank: plans may grow to it
CHECKPOINT = "MOE_CHECKPOINT"  # a Hugging Face checkpoint directory; absent: synthetic from SEED
SEED = "MOE_SEED"

# Serving: the KV cache budget, batching, the waiting queue, the OpenAI-compatible API (leader).
KV_CACHE_TOKENS = "MOE_KV_CACHE_TOKENS"  # KV cache budget of each rank, in tokens
MAX_BATCH_TOKENS = "MOE_MAX_BATCH_TOKENS"  # new tokens per rank per step (chunked prefill)
MAX_QUEUED_REQUESTS = "MOE_MAX_QUEUED_REQUESTS"  # waiting requests; beyond them HTTP 429
API_PORT = "MOE_API_PORT"  # /v1/completions, /v1/models on rank 0; 0 disables the API
API_KEYS_PATH = "MOE_API_KEYS_PATH"  # file of accepted API keys, one per line; absent: open
SERVED_MODEL_NAME = "MOE_SERVED_MODEL_NAME"  # the `model` clients name; default from the weights
CHAT_TEMPLATE = "MOE_CHAT_TEMPLATE"  # a Jinja chat template file; absent: the checkpoint's
STALL_TIMEOUT = "MOE_STALL_TIMEOUT"  # seconds without a step before the rank reports not live
COLLECTIVE_TIMEOUT = "MOE_COLLECTIVE_TIMEOUT"  # seconds a collective waits for a peer, then fails
STARTUP_TIMEOUT = "MOE_STARTUP_TIMEOUT"  # seconds a rank waits for its peers to join and load
SWITCH_TIMEOUT = "MOE_SWITCH_TIMEOUT"  # seconds POST /v1/plan waits for every rank to switch
DRAIN_TIMEOUT = "MOE_DRAIN_TIMEOUT"  # seconds a SIGTERM waits for running sequences to finish
HEARTBEAT_TIMEOUT = "MOE_HEARTBEAT_TIMEOUT"  # seconds a silent rank keeps its place in the group
BACKGROUND_SWITCH = "MOE_BACKGROUND_SWITCH"  # experts move while the old plan serves (default on)
TWO_BATCH_OVERLAP = "MOE_TWO_BATCH_OVERLAP"  # two micro-batches per step, all-to-all overlapped
TERMINATION_MESSAGE_PATH = "MOE_TERMINATION_MESSAGE_PATH"  # where a fatal error is written

# Files and ports.
PLAN_PATH = "MOE_PLAN_PATH"
TOKEN_PATH = "MOE_TOKEN_PATH"
HTTP_PORT = "MOE_HTTP_PORT"  # /metrics, /healthz, /readyz, /v1/plan
BIND_ADDRESS = "MOE_BIND_ADDRESS"  # default 127.0.0.1, in a pod 0.0.0.0; the local node agent
# gives each pod its own 127.x.y.z
POD_IP = "MOE_POD_IP"  # the pod's IP (downward API): where rank 0's rendezvous store listens
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
CONTROL_ADDRESS = "MOE_CONTROL_ADDRESS"  # a rank's control app; absent: BIND_ADDRESS (see below)

# Built-in traffic (a benchmark knob; how imbalance is produced on purpose): generated requests.
TRAFFIC_BATCH = "MOE_TRAFFIC_BATCH"  # requests in flight per rank; 0 disables the source
TRAFFIC_SEQ_LEN = "MOE_TRAFFIC_SEQ_LEN"  # prompt tokens of each generated request
TRAFFIC_ZIPF = "MOE_TRAFFIC_ZIPF"  # Zipf exponent of prompt tokens over the vocabulary
TRAFFIC_INTERVAL = "MOE_TRAFFIC_INTERVAL"  # seconds between two top-ups of the requests in flight
TRAFFIC_MAX_TOKENS = "MOE_TRAFFIC_MAX_TOKENS"  # tokens each generated request generates

PLAN_MOUNT_DIR = "/etc/moe-ep/plan"
TOKEN_MOUNT_DIR = "/etc/moe-ep/control"
TOKEN_FILE_NAME = "token"
CHECKPOINT_MOUNT_DIR = "/models"  # a MoEDeployment's checkpoint volume, mounted read-only
API_KEYS_MOUNT_DIR = "/etc/moe-ep/api-keys"  # the API keys Secret's key, as API_KEYS_FILE_NAME
API_KEYS_FILE_NAME = "keys"
TERMINATION_MESSAGE_FILE = "/dev/termination-log"  # Kubernetes' terminationMessagePath default
DEFAULT_MASTER_PORT = 29500
DEFAULT_HTTP_PORT = 8080
DEFAULT_API_PORT = 8000

RESERVED_ENV_PREFIXES = ("MOE_", "PYTHON", "LD_")
"""Environment a MoEDeployment may not set (`spec.worker.extraEnv`): the operator's own
variables, and the interpreter's and the dynamic loader's (PYTHONPATH, LD_PRELOAD: code
injection into a process that holds the control token)."""
RESERVED_ENV_NAMES = frozenset({"PATH", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"})
"""Single reserved names: the executable search path and torch.distributed's rendezvous."""


def is_reserved_env(name: str) -> bool:
    """Whether `name` is the operator's to set (see RESERVED_ENV_PREFIXES and _NAMES)."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


SHAPE_VARIABLES = {
    "architecture": ARCHITECTURE,
    "layers": LAYERS,
    "experts": EXPERTS_PER_LAYER,
    "hidden": HIDDEN_SIZE,
    "ffn_hidden": FFN_HIDDEN_SIZE,
    "heads": ATTENTION_HEADS,
    "kv_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "top_k": TOP_K,
    "dtype": DTYPE,
    "vocab_size": VOCAB_SIZE,
    "dense_layers": DENSE_LAYERS,
    "dense_ffn_hidden": DENSE_FFN_HIDDEN_SIZE,
    "shared_ffn_hidden": SHARED_FFN_HIDDEN_SIZE,
    "kv_lora_rank": KV_LORA_RANK,
    "q_lora_rank": Q_LORA_RANK,
    "rope_head_dim": ROPE_HEAD_DIM,
    "v_head_dim": V_HEAD_DIM,
}
"""ModelShape field -> the variable carrying it."""
_TEXT_FIELDS = ("architecture", "dtype")


def declared_shape_fields(environ: Mapping[str, str]) -> frozenset[str]:
    """The ModelShape fields the environment sets (a checkpoint is checked against them only)."""
    return frozenset(
        f for f, name in SHAPE_VARIABLES.items() if environ.get(name) not in (None, "")
    )


def shape_to_env(shape: ModelShape) -> dict[str, str]:
    """The variables that carry `shape` to a pod (unset optional fields are left out).

    The optional sizes (dense layers, shared experts, MLA) travel only for the architectures
    that have them (`EXTRA_FIELDS`), zeros included, so their checkpoints are checked against
    every one; other pods keep the template they had before those sizes existed (a changed
    template restarts the whole group on an operator upgrade).
    """
    optional = frozenset(f for fields in EXTRA_FIELDS.values() for f in fields)
    sent = set(SHAPE_VARIABLES) - optional | set(EXTRA_FIELDS.get(shape.architecture, ()))
    values = {field: getattr(shape, field) for field in SHAPE_VARIABLES if field in sent}
    return {SHAPE_VARIABLES[f]: str(value) for f, value in values.items() if value is not None}


def shape_from_env(environ: Mapping[str, str], base: ModelShape | None = None) -> ModelShape:
    """The shape a pod's environment describes; unset variables keep `base`'s values.

    Raises ValueError naming the variable when a value is not a number or the shape is invalid.
    """
    changes: dict[str, object] = {}
    for field, name in SHAPE_VARIABLES.items():
        value = environ.get(name)
        if value in (None, ""):
            continue
        if field in _TEXT_FIELDS:
            changes[field] = value
            continue
        try:
            changes[field] = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not an integer") from None
    return (base or ModelShape()).replace(**changes)


def rank_from_pod_name(pod_name: str) -> int | None:
    """The StatefulSet ordinal, the suffix after the last '-': `moe-demo-3` -> 3; None if none.

    It is the pod's rank when a pod runs one rank; with several, see `pod_ranks`.
    """
    suffix = pod_name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def pod_ranks(ordinal: int, ranks_per_pod: int) -> range:
    """The global ranks of pod `ordinal` when every pod runs `ranks_per_pod` of them: local rank
    r is global rank ordinal x ranks_per_pod + r (GPU r of the pod), so NCCL keeps the ranks of
    one node, NVLink-connected, next to each other."""
    return range(ordinal * ranks_per_pod, (ordinal + 1) * ranks_per_pod)


def pod_of_rank(rank: int, ranks_per_pod: int) -> int:
    """The ordinal of the pod that runs global rank `rank`."""
    return rank // ranks_per_pod


def internal_control_port(port: int, local_rank: int) -> int:
    """Control port of local rank `local_rank` in a pod of several ranks. The pod's own `port`
    (probes, /metrics, /v1/plan) is served by its launcher, which asks its ranks on these."""
    return port + 1 + local_rank


def internal_control_address(bind_address: str) -> str:
    """Where the ranks of a pod of several ranks listen: the pod's loopback when the pod listens
    on every address (a real pod: nothing outside reaches them), else the pod's own address (the
    local node agent's pods share the host's loopback, each on its own 127.x.y.z)."""
    return "127.0.0.1" if bind_address in WILDCARD_ADDRESSES else bind_address
