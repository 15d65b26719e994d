"""Frozen configuration of one worker: its model shape and the rank's process settings.

Read from the environment the operator sets on pods (names in `moe_contract.env`); command-line
flags override, except in a pod where the operator owns the setting (`moe_worker.main`). The local
launcher hands each rank its settings back through the same variables (`settings_to_env`).
Configuration objects hold plain values only: no process groups, tensors or clients.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_contract import env
from moe_contract.shape import ModelShape


@dataclass(frozen=True)
class TrafficSettings:
    """The built-in traffic: requests the leader generates itself, a benchmark knob that also
    produces expert imbalance on purpose (popular prompt tokens send their experts more work)."""

    batch: int = 0
    """Generated requests kept in flight per rank; 0 disables the source."""
    seq_len: int = 16
    """Prompt tokens of each generated request."""
    zipf: float = 0.0
    """Zipf exponent of prompt tokens over the vocabulary (token v has weight (v+1)^-zipf)."""
    interval: float = 0.1
    """Seconds between two top-ups of the requests in flight."""
    max_tokens: int = 1
    """Tokens each generated request generates (1: a prefill and one sampled token)."""


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one rank process needs to join the group and serve."""

    rank: int = 0
    local_rank: int = 0
    """Index among the ranks of this machine or pod: picks the GPU."""
    world_size: int = 1
    ranks_per_pod: int = 1
    """Rank processes in each pod (one per GPU): `moe-worker serve` in a pod of several starts
    them all (`launcher.launch_pod`); rank = pod ordinal x ranks_per_pod + local rank."""
    master_addr: str = "127.0.0.1"
    master_port: int = env.DEFAULT_MASTER_PORT
    backend: str = ""
    """gloo | nccl; empty picks nccl on cuda and gloo on cpu."""
    device: str = ""
    """cpu | cuda; empty picks cuda when available."""
    model: ModelShape = field(default_factory=ModelShape)
    declared_shape: frozenset[str] = frozenset()
    """ModelShape fields set explicitly (environment or flags); a checkpoint must agree with them,
    and gives the others."""
    slots_per_rank: int = 1
    """Slots per rank of the initial round-robin plan (used when no plan file exists)."""
    max_slots_per_rank: int | None = None
    """The most slots per rank a plan may give this group (placement.maxSlotsPerRank: the
    memory the user gives expert weights); a plan above it is refused with HTTP 422. None: no
    limit but the memory a device measures free."""
    plan_path: str | None = None
    token_path: str | None = None
    http_port: int = env.DEFAULT_HTTP_PORT
    """Control routes of every rank: /healthz, /readyz, /metrics, /v1/plan."""
    bind_address: str = "0.0.0.0"
    control_address: str | None = None
    """Where the control app listens; None: bind_address. A pod's launcher keeps its ranks'
    control apps off the pod's address (it answers for the pod there) and the API on it."""
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    seed: int = 0
    """Seed of synthetic weights (no checkpoint) and of generated traffic."""
    checkpoint: str | None = None
    """A Hugging Face checkpoint directory; None: synthetic weights of `model`."""
    switch_timeout: float = 60.0
    """Seconds POST /v1/plan waits for every rank to switch; a background switch whose experts
    have not all landed by then is abandoned (the old plan keeps serving)."""
    background_switch: bool = True
    """Move a new plan's experts while the old plan serves, then flip every rank at one step
    boundary (the pause is the flip); false: stop serving while they move."""
    two_batch_overlap: bool = False
    """Run each step as two micro-batches, one's all-to-all in flight while the other computes
    (`moe_worker.ep.two_batch`). Off by default on every device: on CPU gloo's all-to-all copies
    its bytes on the same busy cores, so overlap adds CPU work (1.1-1.6x per step) and measured
    slower or within noise; not yet measured on GPUs (docs/performance.md, issue 13)."""
    kv_cache_tokens: int = 8192
    """KV cache budget of each rank, in tokens (all layers)."""
    max_batch_tokens: int = 512
    """New tokens one rank runs per step (decodes + prompt chunks); also its most sequences."""
    max_queued_requests: int = 128
    """Requests waiting for a KV budget; beyond them the API answers 429."""
    api_port: int = env.DEFAULT_API_PORT
    """OpenAI-compatible API of the leader; 0 serves none."""
    api_keys_path: str | None = None
    """File of accepted API keys, one per line; None leaves the API open."""
    served_model_name: str | None = None
    """The model name clients use; None: the checkpoint directory's name, or the architecture."""
    stall_timeout: float = 120.0
    """Seconds the serving loop may go without a step before the rank reports not live."""
    collective_timeout: float = 120.0
    """Seconds a collective of the serving loop waits for a peer before it fails (the process
    group's timeout): a dead or hung peer ends the rank's loop, which exits non-zero."""
    startup_timeout: float = 1800.0
    """Seconds a rank waits for all its peers to join, and then to load their weights (pods
    start minutes apart: image pulls, checkpoint reads); collectives start only after both."""
    termination_message_path: str = env.TERMINATION_MESSAGE_FILE
    """A fatal error is written there too, when that file exists (Kubernetes mounts it)."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def replace(self, **changes: object) -> WorkerSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def boolean(text: str) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


SETTING_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "world_size": (env.WORLD_SIZE, int),
    "ranks_per_pod": (env.RANKS_PER_POD, int),
    "local_rank": (env.LOCAL_RANK, int),
    "master_addr": (env.MASTER_ADDR, str),
    "master_port": (env.MASTER_PORT, int),
    "backend": (env.BACKEND, str),
    "device": (env.DEVICE, str),
    "slots_per_rank": (env.SLOTS_PER_RANK, int),
    "max_slots_per_rank": (env.MAX_SLOTS_PER_RANK, int),
    "plan_path": (env.PLAN_PATH, str),
    "token_path": (env.TOKEN_PATH, str),
    "http_port": (env.HTTP_PORT, int),
    "bind_address": (env.BIND_ADDRESS, str),
    "control_address": (env.CONTROL_ADDRESS, str),
    "seed": (env.SEED, int),
    "checkpoint": (env.CHECKPOINT, str),
    "switch_timeout": (env.SWITCH_TIMEOUT, float),
    "background_switch": (env.BACKGROUND_SWITCH, boolean),
    "two_batch_overlap": (env.TWO_BATCH_OVERLAP, boolean),
    "kv_cache_tokens": (env.KV_CACHE_TOKENS, int),
    "max_batch_tokens": (env.MAX_BATCH_TOKENS, int),
    "max_queued_requests": (env.MAX_QUEUED_REQUESTS, int),
    "api_port": (env.API_PORT, int),
    "api_keys_path": (env.API_KEYS_PATH, str),
    "served_model_name": (env.SERVED_MODEL_NAME, str),
    "stall_timeout": (env.STALL_TIMEOUT, float),
    "collective_timeout": (env.COLLECTIVE_TIMEOUT, float),
    "startup_timeout": (env.STARTUP_TIMEOUT, float),
    "termination_message_path": (env.TERMINATION_MESSAGE_PATH, str),
}
"""WorkerSettings field -> (variable, type), besides rank, the model shape and traffic."""

TRAFFIC_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "batch": (env.TRAFFIC_BATCH, int),
    "seq_len": (env.TRAFFIC_SEQ_LEN, int),
    "zipf": (env.TRAFFIC_ZIPF, float),
    "interval": (env.TRAFFIC_INTERVAL, float),
    "max_tokens": (env.TRAFFIC_MAX_TOKENS, int),
}


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else None


def _parsed(
    environ: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]
) -> dict[str, object]:
    values: dict[str, object] = {}
    for attr, (name, kind) in table.items():
        raw = _get(environ, name)
        if raw is None:
            continue
        try:
            values[attr] = kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None
    return values


def rank_from_env(environ: Mapping[str, str]) -> int | None:
    """MOE_RANK, else the first rank of the pod MOE_POD_NAME names (its ordinal x
    MOE_RANKS_PER_POD), else None (no rank given)."""
    if (rank := _get(environ, env.RANK)) is not None:
        return int(rank)
    if (pod := _get(environ, env.POD_NAME)) is not None:
        ordinal = env.rank_from_pod_name(pod)
        if ordinal is None:
            raise ValueError(f"{env.POD_NAME}={pod!r} has no ordinal suffix")
        return env.pod_ranks(ordinal, ranks_per_pod_from_env(environ)).start
    return None


def ranks_per_pod_from_env(environ: Mapping[str, str]) -> int:
    raw = _get(environ, env.RANKS_PER_POD) or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{env.RANKS_PER_POD}={raw!r} is not a positive integer")
    return int(raw)


def runs_pod_ranks(environ: Mapping[str, str]) -> bool:
    """Whether this process is a pod's launcher: in a pod of several ranks, no rank given."""
    return (
        _get(environ, env.POD_NAME) is not None
        and _get(environ, env.RANK) is None
        and ranks_per_pod_from_env(environ) > 1
    )


def settings_from_env(environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Settings from the operator's pod environment; unset names keep the defaults."""
    environ = os.environ if environ is None else environ
    return WorkerSettings(
        rank=rank_from_env(environ) or 0,
        model=env.shape_from_env(environ),
        declared_shape=env.declared_shape_fields(environ),
        traffic=TrafficSettings(**_parsed(environ, TRAFFIC_VARIABLES)),  # type: ignore[arg-type]
        **_parsed(environ, SETTING_VARIABLES),  # type: ignore[arg-type]
    )


def settings_to_env(settings: WorkerSettings) -> dict[str, str]:
    """The variables that give a rank process exactly `settings` (the launcher's hand-over).

    Only the declared shape fields travel, so a rank still takes the others from its checkpoint.
    """
    values = {env.RANK: str(settings.rank)}
    for attr, (name, _) in SETTING_VARIABLES.items():
        value = getattr(settings, attr)
        if value is not None:
            values[name] = str(value)
    for attr, (name, _) in TRAFFIC_VARIABLES.items():
        values[name] = str(getattr(settings.traffic, attr))
    shape = env.shape_to_env(settings.model)
    for attr in settings.declared_shape:
        name = env.SHAPE_VARIABLES[attr]
        if name in shape:
            values[name] = shape[name]
    return values
