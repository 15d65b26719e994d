"""The plan a group starts on: the one mounted from the operator's ConfigMap when it fits the
model, else the round-robin plan; the leader's copy is the one every rank loads."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from moe_contract.plan import PLAN_FILE_NAME, Plan, PlanError, parse_plan, round_robin_plan
from moe_contract.plan import validate_plan as check_plan
from moe_worker.ep import group
from moe_worker.ep.comm import Comm
from moe_worker.settings import WorkerSettings

log = logging.getLogger("moe_worker")


def read_initial_plan(settings: WorkerSettings) -> Plan:
    """The mounted plan if it fits this model, else (with a warning) the round-robin plan."""
    m, world = settings.model, settings.world_size
    if settings.plan_path:
        path = Path(settings.plan_path)
        path = path / PLAN_FILE_NAME if path.is_dir() else path
        if path.is_file():
            try:
                plan = parse_plan(path.read_text())
                check_plan(
                    plan,
                    num_layers=m.layers,
                    num_experts=m.experts,
                    world_size=world,
                    max_slots_per_rank=settings.max_slots_per_rank,
                )
                return plan
            except (PlanError, OSError) as error:
                log.warning(
                    "the mounted plan %s does not fit this model (%s); starting on the "
                    "round-robin plan",
                    path,
                    error,
                )
    slots = max(settings.slots_per_rank, math.ceil(m.experts / world))
    return round_robin_plan(m.layers, m.experts, world, slots)


def agreed_initial_plan(settings: WorkerSettings, comm: Comm | None = None) -> Plan:
    """Collective: the leader's initial plan, on every rank. The leader's wins: mounted
    ConfigMaps can lag by a sync period between pods."""
    mine = read_initial_plan(settings).to_json() if settings.is_leader else None
    return parse_plan(group.broadcast_text(mine, comm))
