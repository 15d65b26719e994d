"""Frozen configuration of one worker: its model shape and the rank's process settings.

Every setting is declared once, in the contract's table (`moe_contract.settings`): its variable,
flags, default and help. Read from the environment the operator sets on pods; command-line flags
override, except in a pod where the operator owns the setting (`moe_worker.main`). The local
launcher hands each rank its settings back through the same variables (`settings_to_env`).
Configuration objects hold plain values only: no process groups, tensors or clients.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_contract import env
from moe_contract import settings as settings_table
from moe_contract.settings import Setting
from moe_contract.shape import ModelShape

POD_BIND_ADDRESS = "0.0.0.0"
"""The bind address of a pod that names none (its own network namespace: the pod's IP and its
loopback, which kubectl port-forward uses); outside a pod the table's default, 127.0.0.1."""


def _default(name: str) -> Any:
    return settings_table.default(name)


@dataclass(frozen=True)
class TrafficSettings:
    """The built-in traffic: requests the leader generates itself, a benchmark knob that also
    produces expert imbalance on purpose (popular prompt tokens send their experts more work).
    Each field is the setting `traffic.<field>` of the contract's table."""

    batch: int = _default("traffic.batch")
    seq_len: int = _default("traffic.seq_len")
    zipf: float = _default("traffic.zipf")
    interval: float = _default("traffic.interval")
    max_tokens: int = _default("traffic.max_tokens")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one rank process needs to join the group and serve. Besides the rank, the
    model shape and the traffic, each field is a setting of `moe_contract.settings`' table:
    its variable, flags, default, help and who sets it in a pod are there."""

    rank: int = 0
    model: ModelShape = field(default_factory=ModelShape)
    declared_shape: frozenset[str] = frozenset()
    """ModelShape fields set explicitly (environment or flags); a checkpoint must agree with them,
    and gives the others."""
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    # The group.
    world_size: int = _default("world_size")
    ranks_per_pod: int = _default("ranks_per_pod")
    local_rank: int = _default("local_rank")
    master_addr: str = _default("master_addr")
    master_port: int = _default("master_port")
    backend: str = _default("backend")
    device: str = _default("device")
    startup_timeout: float = _default("startup_timeout")
    collective_timeout: float = _default("collective_timeout")
    stall_timeout: float = _default("stall_timeout")
    heartbeat_timeout: float = _default("heartbeat_timeout")
    # Weights and plans.
    checkpoint: str | None = _default("checkpoint")
    seed: int = _default("seed")
    plan_path: str | None = _default("plan_path")
    slots_per_rank: int = _default("slots_per_rank")
    max_slots_per_rank: int | None = _default("max_slots_per_rank")
    switch_timeout: float = _default("switch_timeout")
    drain_timeout: float = _default("drain_timeout")
    background_switch: bool = _default("background_switch")
    # Serving.
    kv_cache_tokens: int = _default("kv_cache_tokens")
    max_batch_tokens: int = _default("max_batch_tokens")
    max_queued_requests: int = _default("max_queued_requests")
    two_batch_overlap: bool = _default("two_batch_overlap")
    # HTTP.
    http_port: int = _default("http_port")
    bind_address: str = _default("bind_address")
    pod_ip: str | None = _default("pod_ip")
    control_address: str | None = _default("control_address")
    token_path: str | None = _default("token_path")
    api_port: int = _default("api_port")
    api_keys_path: str | None = _default("api_keys_path")
    served_model_name: str | None = _default("served_model_name")
    chat_template: str | None = _default("chat_template")
    termination_message_path: str = _default("termination_message_path")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def store_address(self) -> str:
        """Where rank 0's rendezvous store listens: the pod's IP (the other pods reach it there,
        and nothing else of the node does), else the bind address."""
        return self.pod_ip or self.bind_address

    def replace(self, **changes: object) -> WorkerSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def field_name(setting: Setting) -> str:
    """The setting's field in its dataclass (`traffic.batch` -> `batch` of TrafficSettings)."""
    return setting.name.removeprefix("traffic.")


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else None


def _parsed(environ: Mapping[str, str], *, traffic: bool) -> dict[str, Any]:
    """Field -> value of every setting (of the traffic, or the others) the environment sets."""
    values: dict[str, Any] = {}
    for setting in settings_table.of_traffic(traffic):
        raw = _get(environ, setting.variable)
        if raw is None:
            continue
        try:
            values[field_name(setting)] = setting.read(raw)
        except ValueError as error:
            raise ValueError(f"{setting.variable}: {error}") from None
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
    values = _parsed(environ, traffic=False)
    if _get(environ, env.POD_NAME) is not None:  # probes, Services, port-forward reach a pod
        values.setdefault("bind_address", POD_BIND_ADDRESS)
    return WorkerSettings(
        rank=rank_from_env(environ) or 0,
        model=env.shape_from_env(environ),
        declared_shape=env.declared_shape_fields(environ),
        traffic=TrafficSettings(**_parsed(environ, traffic=True)),
        **values,
    )


def settings_to_env(settings: WorkerSettings) -> dict[str, str]:
    """The variables that give a rank process exactly `settings` (the launcher's hand-over).

    Only the declared shape fields travel, so a rank still takes the others from its checkpoint.
    """
    values = {env.RANK: str(settings.rank)}
    for setting in settings_table.WORKER_SETTINGS:
        owner = settings.traffic if setting.name.startswith("traffic.") else settings
        value = getattr(owner, field_name(setting))
        if value is not None:
            values[setting.variable] = str(value)
    shape = env.shape_to_env(settings.model)
    for attr in settings.declared_shape:
        name = env.SHAPE_VARIABLES[attr]
        if name in shape:
            values[name] = shape[name]
    return values
