"""Bodies run on every rank of a gloo world by the distributed tests (imported by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_worker.baseline import TPPPModel
from moe_worker.engine import EPEngine
from moe_worker.model import reference_forward
from moe_worker.plan import Plan, parse_plan, round_robin_plan
from moe_worker.shape import ModelShape

FIXTURES = Path(__file__).parent.parent / "fixtures" / "plans"
CONFIG = ModelShape(layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8, top_k=2)
SEED = 7


def fixture_plan(name: str) -> Plan:
    return parse_plan((FIXTURES / name).read_text())


def batch() -> torch.Tensor:
    return torch.randn(8, 6, CONFIG.hidden, generator=torch.Generator().manual_seed(3))


def _gate_bias(plan: Plan) -> torch.Tensor | None:
    return None if plan.gate_bias is None else torch.tensor(plan.gate_bias)


def _ep_error(engine: EPEngine, rank: int, world: int) -> float:
    """Max |EP - reference| over this rank's share of the batch, under the engine's current plan."""
    x = batch()
    expected, _ = reference_forward(CONFIG, x, SEED, _gate_bias(engine.plan))
    got = engine.forward(x.tensor_split(world)[rank])
    return float((got - expected.tensor_split(world)[rank]).abs().max())


def _global_counts(engine: EPEngine) -> list[list[int]]:
    counts = engine.counts_LE.clone()
    dist.all_reduce(counts)
    return counts.tolist()


def all_cases(rank: int, world: int) -> dict[str, Any]:
    """Every EP and baseline equivalence scenario, in one process group (forks are slow)."""
    results: dict[str, Any] = {}
    _, ref_counts = reference_forward(CONFIG, batch(), SEED)
    results["reference_counts"] = ref_counts.tolist()

    engine = EPEngine(CONFIG, round_robin_plan(2, 4, world), rank=rank, seed=SEED)
    results["round_robin"] = _ep_error(engine, rank, world)
    results["round_robin_counts"] = _global_counts(engine)

    engine = EPEngine(
        CONFIG, fixture_plan("replicated-2layer-4expert-4rank-2slots.json"), rank=rank, seed=SEED
    )
    results["replicated"] = _ep_error(engine, rank, world)
    results["replicated_counts"] = _global_counts(engine)
    results["replicated_local_counts"] = engine.counts_LE.tolist()

    # Serve, switch, serve: replicas appear, experts move, gate bias arrives, back to round-robin.
    engine = EPEngine(CONFIG, round_robin_plan(2, 4, world), rank=rank, seed=SEED)
    errors = [_ep_error(engine, rank, world)]
    for plan in (
        fixture_plan("replicated-2layer-4expert-4rank-2slots.json"),
        fixture_plan("gate-bias-2layer-4expert-4rank.json"),
        round_robin_plan(2, 4, world, version=4),
    ):
        engine.apply_plan(plan)
        errors.append(_ep_error(engine, rank, world))
    results["switch"] = errors
    results["switch_slots"] = [len(layer) for layer in engine.shard]

    baseline = TPPPModel(CONFIG, tp=2, pp=2, seed=SEED)
    expected, _ = reference_forward(CONFIG, batch(), SEED)
    out = baseline.forward(batch(), micro_batches=3)
    results["tppp"] = None if out is None else float((out - expected).abs().max())
    return results
