"""Names of the environment variables and paths the operator sets on worker pods.

The second half of the operator -> worker contract (the first is `moe_worker.plan`). The operator's
StatefulSet builder and the worker's settings parser both import these names, so they cannot drift.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

# Identity and process group.
POD_NAME = "MOE_POD_NAME"  # the rank is the StatefulSet ordinal: the suffix after the last '-'
RANK = "MOE_RANK"  # optional override of the rank taken from POD_NAME
WORLD_SIZE = "MOE_WORLD_SIZE"
MASTER_ADDR = "MOE_MASTER_ADDR"  # DNS name of rank 0 through the headless Service
MASTER_PORT = "MOE_MASTER_PORT"
BACKEND = "MOE_BACKEND"  # nccl | gloo
DEVICE = "MOE_DEVICE"  # cuda | cpu

# Parallel layout (world size = expert x tensor x pipeline).
EXPERT_PARALLEL = "MOE_EXPERT_PARALLEL"
TENSOR_PARALLEL = "MOE_TENSOR_PARALLEL"
PIPELINE_PARALLEL = "MOE_PIPELINE_PARALLEL"

# Model shape.
LAYERS = "MOE_LAYERS"
EXPERTS_PER_LAYER = "MOE_EXPERTS_PER_LAYER"
HIDDEN_SIZE = "MOE_HIDDEN_SIZE"
FFN_HIDDEN_SIZE = "MOE_FFN_HIDDEN_SIZE"
ATTENTION_HEADS = "MOE_ATTENTION_HEADS"
HEAD_DIM = "MOE_HEAD_DIM"
TOP_K = "MOE_TOP_K"
DTYPE = "MOE_DTYPE"  # bfloat16 | float16 | float32
SLOTS_PER_RANK = "MOE_SLOTS_PER_RANK"
CHECKPOINT = "MOE_CHECKPOINT"  # optional safetensors file; absent: deterministic init from SEED
SEED = "MOE_SEED"

# Files and ports.
PLAN_PATH = "MOE_PLAN_PATH"
TOKEN_PATH = "MOE_TOKEN_PATH"
HTTP_PORT = "MOE_HTTP_PORT"  # /metrics, /healthz, /readyz, /v1/plan, /v1/forward
BIND_ADDRESS = (
    "MOE_BIND_ADDRESS"  # default 0.0.0.0; the local node agent gives each pod its own 127.x.y.z
)

# Built-in traffic source (how imbalance is produced on purpose).
TRAFFIC_BATCH = "MOE_TRAFFIC_BATCH"  # sequences per step per rank; 0 disables the source
TRAFFIC_SEQ_LEN = "MOE_TRAFFIC_SEQ_LEN"
TRAFFIC_ZIPF = (
    "MOE_TRAFFIC_ZIPF"  # Zipf exponent of expert popularity, added as a gate logit offset
)
TRAFFIC_INTERVAL = "MOE_TRAFFIC_INTERVAL"  # seconds to sleep between steps

PLAN_MOUNT_DIR = "/etc/moe-ep/plan"
TOKEN_MOUNT_DIR = "/etc/moe-ep/control"
TOKEN_FILE_NAME = "token"
DEFAULT_MASTER_PORT = 29500
DEFAULT_HTTP_PORT = 8080
