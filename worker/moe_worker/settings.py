"""Frozen configuration of one worker: its model shape and the rank's process settings.

Read from the environment the operator sets on pods (names in `moe_worker.env`); command-line flags
override. Configuration objects hold plain values only: no process groups, tensors or clients.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from moe_worker import env
from moe_worker.shape import ModelShape


@dataclass(frozen=True)
class TrafficSettings:
    """The built-in traffic source: how much load each rank generates and how skewed it is."""

    batch: int = 0
    """Sequences per step per rank; 0 disables the source (only /v1/forward drives steps)."""
    seq_len: int = 16
    """Tokens per sequence."""
    zipf: float = 0.0
    """Zipf exponent of expert popularity, applied as a gate-logit offset; 0 is uniform."""
    interval: float = 0.1
    """Seconds between generated steps."""


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one rank process needs to join the group and serve."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = env.DEFAULT_MASTER_PORT
    backend: str = ""
    """gloo | nccl; empty picks nccl on cuda and gloo on cpu."""
    device: str = ""
    """cpu | cuda; empty picks cuda when available."""
    model: ModelShape = field(default_factory=ModelShape)
    slots_per_rank: int = 1
    """Slots per rank of the initial round-robin plan (used when no plan file exists)."""
    plan_path: str | None = None
    token_path: str | None = None
    http_port: int = env.DEFAULT_HTTP_PORT
    bind_address: str = "0.0.0.0"
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    seed: int = 0
    """Seed of the deterministic weight init (and of generated traffic)."""
    checkpoint: str | None = None
    """Safetensors file with one tensor per expert per layer; None: deterministic init."""
    switch_timeout: float = 60.0
    """Seconds POST /v1/plan waits for every rank to switch."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def replace(self, **changes: object) -> WorkerSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else None


def settings_from_env(environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Settings from the operator's pod environment; unset names keep the defaults."""
    environ = os.environ if environ is None else environ
    if (rank := _get(environ, env.RANK)) is not None:
        rank_value = int(rank)
    elif (pod := _get(environ, env.POD_NAME)) is not None:
        ordinal = env.rank_from_pod_name(pod)
        if ordinal is None:
            raise ValueError(f"{env.POD_NAME}={pod!r} has no ordinal suffix")
        rank_value = ordinal
    else:
        rank_value = 0
    base = WorkerSettings()
    traffic = TrafficSettings(
        batch=int(_get(environ, env.TRAFFIC_BATCH) or base.traffic.batch),
        seq_len=int(_get(environ, env.TRAFFIC_SEQ_LEN) or base.traffic.seq_len),
        zipf=float(_get(environ, env.TRAFFIC_ZIPF) or base.traffic.zipf),
        interval=float(_get(environ, env.TRAFFIC_INTERVAL) or base.traffic.interval),
    )
    return WorkerSettings(
        rank=rank_value,
        world_size=int(_get(environ, env.WORLD_SIZE) or 1),
        master_addr=_get(environ, env.MASTER_ADDR) or base.master_addr,
        master_port=int(_get(environ, env.MASTER_PORT) or base.master_port),
        backend=_get(environ, env.BACKEND) or "",
        device=_get(environ, env.DEVICE) or "",
        model=env.shape_from_env(environ),
        slots_per_rank=int(_get(environ, env.SLOTS_PER_RANK) or 1),
        plan_path=_get(environ, env.PLAN_PATH),
        token_path=_get(environ, env.TOKEN_PATH),
        http_port=int(_get(environ, env.HTTP_PORT) or base.http_port),
        bind_address=_get(environ, env.BIND_ADDRESS) or base.bind_address,
        traffic=traffic,
        seed=int(_get(environ, env.SEED) or 0),
        checkpoint=_get(environ, env.CHECKPOINT),
    )
