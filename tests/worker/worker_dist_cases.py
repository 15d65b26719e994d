"""Bodies run on every rank of a gloo world by the distributed tests (imported by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_contract.plan import Plan, parse_plan, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.baseline import TPPPModel
from moe_worker.bench.data_path import ep_prefill
from moe_worker.ep.engine import EPEngine
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.models.weights import SyntheticWeights, build_model, local_experts
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.transfer import DONE, new_transfer_group

FIXTURES = Path(__file__).parent.parent / "fixtures" / "plans"
SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8, kv_heads=2, vocab_size=64
)
SEED = 7


def fixture_plan(name: str) -> Plan:
    return parse_plan((FIXTURES / name).read_text())


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, SHAPE.vocab_size, (n,), generator=g).tolist() for n in (6, 1, 9, 4, 7)]


def reference(source: SyntheticWeights, gate_bias: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process logits of every prompt's last token [B, V] and routed counts [L, E]."""
    model, experts = build_model(source), local_experts(source)
    texts = prompts()
    cache = KVCache.for_shape(SHAPE, 256)
    batch = StepBatch.build([(i, t, 0) for i, t in enumerate(texts)])
    bias = None if gate_bias is None else torch.tensor(gate_bias)
    with torch.no_grad():
        logits = model(batch, cache, experts, bias)
    return logits, experts.counts_LE


def _share(rank: int, world: int) -> list[int]:
    return torch.arange(len(prompts())).tensor_split(world)[rank].tolist()


def _ep_error(
    engine: EPEngine, source: SyntheticWeights, rank: int, world: int, two_batch: bool = False
) -> float:
    """Max |EP - reference| of this rank's prompts, under the engine's current plan."""
    expected, _ = reference(source, engine.plan.gate_bias)
    mine = _share(rank, world)
    got = ep_prefill(engine, [prompts()[i] for i in mine], torch.device("cpu"), two_batch)
    return float((got - expected[mine]).abs().max()) if mine else 0.0


def _global_counts(engine: EPEngine) -> list[list[int]]:
    counts = engine.counts_LE.clone()
    dist.all_reduce(counts)
    return counts.tolist()


def all_cases(rank: int, world: int) -> dict[str, Any]:
    """Every EP and baseline equivalence scenario, in one process group (forks are slow)."""
    source = SyntheticWeights.for_shape(SHAPE, seed=SEED)
    results: dict[str, Any] = {}
    _, ref_counts = reference(source)
    results["reference_counts"] = ref_counts.tolist()

    engine = EPEngine(source, round_robin_plan(2, 4, world), rank=rank)
    held = engine.held_experts()
    results["loaded"] = sorted((layer, e) for layer, experts in enumerate(held) for e in experts)
    results["round_robin"] = _ep_error(engine, source, rank, world)
    results["round_robin_counts"] = _global_counts(engine)

    replicated = fixture_plan("replicated-2layer-4expert-4rank-2slots.json")
    engine = EPEngine(source, replicated, rank=rank)
    results["replicated"] = _ep_error(engine, source, rank, world)
    results["replicated_counts"] = _global_counts(engine)
    results["replicated_local_counts"] = engine.counts_LE.tolist()

    # The same slots with ranksPerPod 2: tokens routed by pod, outputs unchanged.
    pods = fixture_plan("pods-2layer-4expert-4rank-2slots.json")
    engine = EPEngine(source, pods, rank=rank)
    results["pods"] = _ep_error(engine, source, rank, world)
    results["pods_counts"] = _global_counts(engine)
    results["pods_local_counts"] = engine.counts_LE.tolist()

    # Serve, switch, serve: replicas appear, experts move, gate bias arrives, back to round-robin.
    engine = EPEngine(source, round_robin_plan(2, 4, world), rank=rank)
    errors, received = [_ep_error(engine, source, rank, world)], []
    for plan in (
        replicated,
        fixture_plan("gate-bias-2layer-4expert-4rank.json"),
        round_robin_plan(2, 4, world, version=4),
    ):
        received.append(ExpertMover(engine).apply(plan))
        errors.append(_ep_error(engine, source, rank, world))
    results["switch"] = errors
    results["switch_received"] = received
    results["switch_held"] = [sorted(held) for held in engine.held_experts()]

    # Two-batch overlap, then a background switch: prefill keeps running on the old plan while
    # the experts move (a group of their own), every rank flips once all of them landed.
    results["two_batch"] = _ep_error(engine, source, rank, world, two_batch=True)
    group = new_transfer_group(60.0)
    mover = ExpertMover(engine)
    transfer = mover.start(replicated.with_version(5), group)
    transfer.watch()
    during, landed = [], torch.zeros(1, dtype=torch.int64)
    while not landed.item():
        during.append(_ep_error(engine, source, rank, world, two_batch=True))
        landed[0] = transfer.status().state == DONE
        dist.all_reduce(landed, op=dist.ReduceOp.MIN)
    mover.flip(replicated.with_version(5), transfer)
    results["background"] = [*during, _ep_error(engine, source, rank, world)]
    results["background_held"] = [sorted(held) for held in engine.held_experts()]
    dist.destroy_process_group(group)

    baseline = TPPPModel(source, tp=2, pp=2)
    expected, _ = reference(source)
    out = baseline.forward(prompts(), micro_batches=3)
    results["tppp"] = None if out is None else float((out - expected).abs().max())
    return results
