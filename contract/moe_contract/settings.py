"""The worker's settings, declared once: for each, the `WorkerSettings` field, the pod environment
variable that carries it, the `moe-worker serve` flags that override it, how its text is read,
its default and help, who sets it in a pod, and the MoEDeployment field it comes from.

Everything else derives from this table: the worker's fields' defaults and its environment parser
(`moe_worker.settings`), the flags of `moe-worker serve` and their help (`moe_worker.main`), the
flags a MoEDeployment's `worker.extraArgs` may set (`USER_FLAGS`: the operator's validation and
the worker in a pod both check them), the variables the operator sets on worker pods
(`moe_operator.manifests.children`), the MoEDeployment's defaults of the fields that carry a
setting (`moe_operator.api`) and docs/worker.md's table (`markdown`, checked by a test).

The model's shape travels apart (`env.SHAPE_VARIABLES`, `moe_contract.shape`), and so does the
rank (`env.RANK`: a pod's is its ordinal). Imports nothing beyond the standard library and `env`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from moe_contract import env

OPERATOR = "operator"
"""The operator sets it on every worker pod (from `spec` when the row names a field, else from
what the MoEDeployment implies: the world size, rank 0's address, the mounted files)."""
USER = "user"
"""A MoEDeployment may set its flag through `spec.worker.extraArgs`; the operator never does."""
LAUNCHER = "launcher"
"""A pod of several ranks: its launcher sets it for each rank it starts."""
NODE = "node"
"""The node (the local cluster's node agent gives each pod its own address); else the default."""
DEFAULT = "default"
"""Nobody in a pod: the default applies."""


def boolean(text: str) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


_KINDS = {"int": "an integer", "float": "a number", "str": "text", "boolean": "a boolean"}


@dataclass(frozen=True)
class Bounds:
    """The values a number setting may take: `low` <= value (< with `above`) <= `high`."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    """The value must be greater than `low` (a timeout of 0 would never wait)."""

    def problem(self, value: float) -> str | None:
        """Why `value` is out of bounds, or None (NaN is out of every bound)."""
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        high_ok = self.high is None or value <= self.high
        if low_ok and high_ok and value == value:
            return None
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.above else '>='} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"<= {_number(self.high)}")
        return f"must be {' and '.join(parts)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE_SECONDS = Bounds(0, 86400, above=True)
"""A timeout or an interval: more than 0 s, at most a day (NaN and inf are refused)."""
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)


@dataclass(frozen=True)
class Setting:
    name: str
    """The `WorkerSettings` field; `traffic.<field>`: a field of its `TrafficSettings`."""
    variable: str
    parse: Callable[[str], Any]
    """How the variable's (or the flag's) text is read: int, float, str or `boolean`."""
    default: Any
    """The worker's own default (None: unset)."""
    help: str
    flags: tuple[str, ...] = ()
    """`moe-worker serve` flags, the first its name; none: the environment only."""
    pod: str = DEFAULT
    """Who sets it in a pod: OPERATOR, USER, LAUNCHER, NODE or DEFAULT."""
    spec: str | None = None
    """The MoEDeploymentSpec field the operator copies it from as it is (snake_case path)."""
    spec_default: Any = None
    """That field's default when it is not the worker's own (None: the same)."""
    bounds: Bounds | None = None
    """The values it may take (numbers); None: any its type reads."""

    def read(self, text: str) -> Any:
        """The setting's value from its text (a variable's, a flag's), checked against its
        bounds; ValueError saying what is wrong, for messages that name the flag or variable."""
        try:
            value = self.parse(text)
        except ValueError:
            kind = _KINDS.get(self.parse.__name__, self.parse.__name__)
            raise ValueError(f"{text[:80]!r} is not {kind}") from None
        if self.bounds is not None:
            problem = self.bounds.problem(value)
            if problem is not None:
                raise ValueError(f"{text[:80]!r}: {problem}")
        return value

    @property
    def dest(self) -> str:
        """Its attribute in `moe-worker serve`'s parsed arguments."""
        return self.name.replace(".", "_")

    @property
    def deployment_default(self) -> Any:
        """The default of the MoEDeployment field that carries it."""
        return self.default if self.spec_default is None else self.spec_default


WORKER_SETTINGS: tuple[Setting, ...] = (
    # Set by the operator on every pod, in the order pods have always listed them (another
    # order would change every pod template, and so restart every group).
    Setting(
        "world_size",
        env.WORLD_SIZE,
        int,
        1,
        "ranks in the group (parallelism.expert x tensor x pipeline)",
        ("--world-size", "--world"),
        OPERATOR,
    ),
    Setting(
        "ranks_per_pod",
        env.RANKS_PER_POD,
        int,
        1,
        "rank processes in each pod, one per GPU: `moe-worker serve` in a pod of several "
        "starts them all (worker.ranksPerPod)",
        pod=OPERATOR,
    ),
    Setting(
        "master_addr",
        env.MASTER_ADDR,
        str,
        "127.0.0.1",
        "rank 0's address, where the group meets (in a cluster: its DNS name)",
        ("--master-addr",),
        OPERATOR,
    ),
    Setting(
        "master_port",
        env.MASTER_PORT,
        int,
        env.DEFAULT_MASTER_PORT,
        "the rendezvous port on rank 0",
        ("--master-port",),
        OPERATOR,
        "worker.master_port",
    ),
    Setting(
        "backend",
        env.BACKEND,
        str,
        "",
        "torch.distributed backend, gloo or nccl; empty: nccl on cuda, else gloo",
        ("--backend",),
        OPERATOR,
        "worker.backend",
        "nccl",
    ),
    Setting(
        "device",
        env.DEVICE,
        str,
        "",
        "cpu or cuda; empty: cuda when a GPU is visible",
        ("--device",),
        OPERATOR,
        "worker.device",
        "cuda",
    ),
    Setting(
        "slots_per_rank",
        env.SLOTS_PER_RANK,
        int,
        1,
        "slots per rank of the round-robin plan (at least experts / world)",
        ("--slots-per-rank",),
        OPERATOR,
        "placement.slots_per_rank",
    ),
    Setting(
        "max_slots_per_rank",
        env.MAX_SLOTS_PER_RANK,
        int,
        None,
        "the most slots per rank a plan may give (placement.maxSlotsPerRank: the memory given "
        "to experts); a plan above it is refused with HTTP 422; none: no limit but the memory "
        "a GPU measures free",
        ("--max-slots-per-rank",),
        OPERATOR,
    ),
    Setting(
        "plan_path",
        env.PLAN_PATH,
        str,
        None,
        "the initial plan, a file or a directory holding plan.json (rank 0's is served); "
        "none, or one that does not fit: the round-robin plan",
        ("--plan",),
        OPERATOR,
    ),
    Setting(
        "token_path",
        env.TOKEN_PATH,
        str,
        None,
        "the control token file (POST /v1/plan needs its token); none refuses every POST",
        ("--token-file",),
        OPERATOR,
    ),
    Setting(
        "http_port",
        env.HTTP_PORT,
        int,
        env.DEFAULT_HTTP_PORT,
        "control port of every rank: /healthz, /readyz, /metrics, /v1/plan",
        ("--http-port",),
        OPERATOR,
        "worker.port",
    ),
    Setting(
        "api_port",
        env.API_PORT,
        int,
        env.DEFAULT_API_PORT,
        "OpenAI-compatible API of the leader (rank 0); 0 serves none",
        ("--api-port",),
        OPERATOR,
        "worker.api_port",
    ),
    Setting(
        "served_model_name",
        env.SERVED_MODEL_NAME,
        str,
        None,
        "the model name clients use; none: the checkpoint directory's name, or "
        "`<architecture>-synthetic`",
        ("--served-model-name",),
        OPERATOR,
    ),
    Setting(
        "kv_cache_tokens",
        env.KV_CACHE_TOKENS,
        int,
        8192,
        "KV cache budget of each rank, in tokens (all layers)",
        ("--kv-cache-tokens",),
        OPERATOR,
        "worker.kv_cache_tokens",
    ),
    Setting(
        "max_batch_tokens",
        env.MAX_BATCH_TOKENS,
        int,
        512,
        "new tokens each rank runs per step (decodes and prompt chunks); also its most "
        "running sequences",
        ("--max-batch-tokens",),
        OPERATOR,
        "worker.max_batch_tokens",
    ),
    Setting(
        "max_queued_requests",
        env.MAX_QUEUED_REQUESTS,
        int,
        128,
        "requests waiting for a KV budget; beyond them the API answers 429",
        ("--max-queued-requests",),
        OPERATOR,
        "worker.max_queued_requests",
    ),
    Setting(
        "stall_timeout",
        env.STALL_TIMEOUT,
        float,
        120.0,
        "seconds the serving loop may go without a step before /healthz fails",
        ("--stall-timeout",),
        OPERATOR,
        "worker.stall_timeout_seconds",
        60,
    ),
    Setting(
        "collective_timeout",
        env.COLLECTIVE_TIMEOUT,
        float,
        120.0,
        "seconds a serving collective waits for a peer before it fails: a dead or hung peer "
        "ends the rank's loop, which exits non-zero",
        ("--collective-timeout",),
        OPERATOR,
        "worker.collective_timeout_seconds",
        120,
    ),
    Setting(
        "termination_message_path",
        env.TERMINATION_MESSAGE_PATH,
        str,
        env.TERMINATION_MESSAGE_FILE,
        "a fatal error is written there too, when the file exists (Kubernetes mounts it)",
        pod=OPERATOR,
    ),
    Setting(
        "checkpoint",
        env.CHECKPOINT,
        str,
        None,
        "a Hugging Face checkpoint directory; none: synthetic weights of the declared shape",
        ("--checkpoint",),
        OPERATOR,
    ),
    Setting(
        "api_keys_path",
        env.API_KEYS_PATH,
        str,
        None,
        "file of accepted API keys, one per line; none leaves the API open",
        ("--api-keys-file",),
        OPERATOR,
    ),
    # Rows added since, after the others: a pod's variables keep their order.
    Setting(
        "pod_ip",
        env.POD_IP,
        str,
        None,
        "this pod's IP (the downward API's status.podIP): rank 0's rendezvous store listens "
        "there only, where the other pods reach it (with hostNetwork, not on the node's other "
        "addresses); none: on the bind address",
        pod=OPERATOR,
    ),
    # Set by a MoEDeployment's worker.extraArgs, if at all.
    Setting(
        "seed",
        env.SEED,
        int,
        0,
        "seed of synthetic weights (no checkpoint) and of generated traffic",
        ("--seed",),
        USER,
        bounds=Bounds(0, 2**63 - 1),
    ),
    Setting(
        "switch_timeout",
        env.SWITCH_TIMEOUT,
        float,
        60.0,
        "seconds POST /v1/plan waits for every rank to switch; a background switch not landed "
        "by then is abandoned and the old plan keeps serving",
        ("--switch-timeout",),
        USER,
        bounds=POSITIVE_SECONDS,
    ),
    Setting(
        "drain_timeout",
        env.DRAIN_TIMEOUT,
        float,
        20.0,
        "seconds a rank drains after SIGTERM before it stops: not ready, new requests 503, "
        "running sequences finish (the pod's terminationGracePeriodSeconds follows it)",
        ("--drain-timeout",),
        USER,
        bounds=Bounds(0, 3600, above=True),
    ),
    Setting(
        "heartbeat_timeout",
        env.HEARTBEAT_TIMEOUT,
        float,
        5.0,
        "seconds a rank's heartbeat may be silent (a stopped or hung process) before the leader "
        "drops it from the group and the others serve without it; a rank that died is dropped "
        "sooner, once a collective failed",
        ("--heartbeat-timeout",),
        USER,
    ),
    Setting(
        "background_switch",
        env.BACKGROUND_SWITCH,
        boolean,
        True,
        "move a new plan's experts while the old plan serves, then flip every rank at one step "
        "(the pause is the flip); false: stop serving while they move",
        ("--background-switch",),
        USER,
    ),
    Setting(
        "two_batch_overlap",
        env.TWO_BATCH_OVERLAP,
        boolean,
        False,
        "run each step as two micro-batches, one's all-to-all in flight while the other "
        "computes (off: on CPUs it adds CPU work and measured no faster; not yet measured on "
        "GPUs)",
        ("--two-batch-overlap",),
        USER,
    ),
    Setting(
        "chat_template",
        env.CHAT_TEMPLATE,
        str,
        None,
        "a Jinja chat template file for /v1/chat/completions, replacing the checkpoint's "
        "(tokenizer_config.json's chat_template, or chat_template.jinja)",
        ("--chat-template",),
        USER,
    ),
    # Built-in traffic: a benchmark knob, and how the demo makes expert load uneven on purpose.
    Setting(
        "traffic.batch",
        env.TRAFFIC_BATCH,
        int,
        0,
        "generated requests the leader keeps in flight per rank; 0: none",
        ("--traffic-batch",),
        USER,
        bounds=Bounds(0, 1 << 16),
    ),
    Setting(
        "traffic.seq_len",
        env.TRAFFIC_SEQ_LEN,
        int,
        16,
        "prompt tokens of each generated request",
        ("--traffic-seq-len",),
        USER,
        bounds=Bounds(1, 1 << 20),
    ),
    Setting(
        "traffic.zipf",
        env.TRAFFIC_ZIPF,
        float,
        0.0,
        "Zipf exponent of generated prompt tokens over the vocabulary (token v has weight "
        "(v+1)^-zipf): popular tokens send their experts more work",
        ("--zipf",),
        USER,
        bounds=Bounds(0, 100),
    ),
    Setting(
        "traffic.interval",
        env.TRAFFIC_INTERVAL,
        float,
        0.1,
        "seconds between two top-ups of the generated requests in flight",
        ("--traffic-interval",),
        USER,
        bounds=POSITIVE_SECONDS,
    ),
    Setting(
        "traffic.max_tokens",
        env.TRAFFIC_MAX_TOKENS,
        int,
        1,
        "tokens each generated request generates (1: a prefill and one sampled token)",
        ("--traffic-max-tokens",),
        USER,
        bounds=Bounds(1, 1 << 20),
    ),
    # Set by a pod's launcher, the node, or nobody.
    Setting(
        "local_rank",
        env.LOCAL_RANK,
        int,
        0,
        "index among the ranks of this machine or pod: picks the GPU",
        pod=LAUNCHER,
    ),
    Setting(
        "control_address",
        env.CONTROL_ADDRESS,
        str,
        None,
        "where a rank's control app listens; none: the bind address (a pod's launcher answers "
        "for the pod there and keeps its ranks' control apps on the pod's loopback)",
        pod=LAUNCHER,
    ),
    Setting(
        "bind_address",
        env.BIND_ADDRESS,
        str,
        "127.0.0.1",
        "address the HTTP servers (and rank 0's rendezvous store, without a pod IP) listen on: "
        "this machine only unless told otherwise; in a pod (MOE_POD_NAME set) unset means "
        "0.0.0.0, where probes, Services and kubectl port-forward reach the pod",
        ("--bind",),
        NODE,
    ),
    Setting(
        "startup_timeout",
        env.STARTUP_TIMEOUT,
        float,
        1800.0,
        "seconds to join the group, and then to load, waiting for every peer (pods start "
        "minutes apart); collectives start only after both",
    ),
)

SETTINGS = {setting.name: setting for setting in WORKER_SETTINGS}
"""The table by setting name."""


def default(name: str) -> Any:
    """The worker's default of setting `name`."""
    return SETTINGS[name].default


def deployment_default(name: str) -> Any:
    """The MoEDeployment's default of the field that carries setting `name`."""
    return SETTINGS[name].deployment_default


def of_traffic(traffic: bool) -> Iterator[Setting]:
    """The settings of the built-in traffic (`traffic.*`), or all the others."""
    return (s for s in WORKER_SETTINGS if s.name.startswith("traffic.") == traffic)


USER_FLAGS = frozenset(s.flags[0] for s in WORKER_SETTINGS if s.pod == USER)
"""Flags of `moe-worker serve` a MoEDeployment may set (`spec.worker.extraArgs`), each with one
value (`--flag value` or `--flag=value`). Every other flag overrides something the operator sets
(model shape, world, rendezvous, plan and token files, ports): the operator refuses them, and a
worker must not let them override the pod environment."""
USER_SETTINGS = {s.flags[0]: s for s in WORKER_SETTINGS if s.pod == USER}
"""The settings of `USER_FLAGS`, by flag: a MoEDeployment's values are read as the worker
reads them (`Setting.read`)."""


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if isinstance(value, str) else str(value)


def markdown() -> str:
    """docs/worker.md's table of settings (`python -m moe_contract.settings` prints it)."""
    lines = [
        "| setting | variable | flag | default | set in a pod by |",
        "|---|---|---|---|---|",
    ]
    for s in WORKER_SETTINGS:
        flags = ", ".join(f"`{flag}`" for flag in s.flags)
        shown = _shown(s.default)
        if s.spec_default is not None:
            shown += f" (MoEDeployment: {_shown(s.spec_default)})"
        who = s.pod if s.spec is None else f"{s.pod} (`{s.spec}`)"
        lines.append(f"| {s.help} | `{s.variable}` | {flags} | {shown} | {who} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
