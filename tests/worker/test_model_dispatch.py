"""Single-process properties of the dispatcher, the EP engine at world 1, plan transfers, settings
and the built-in traffic."""

from __future__ import annotations

import pytest
import torch

from moe_contract.env import rank_from_pod_name
from moe_contract.plan import Plan, plan_transfers, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import ep_prefill
from moe_worker.ep.dispatch import LocalDispatcher, Placement
from moe_worker.ep.engine import EPEngine, plan_experts
from moe_worker.models import Routing, route
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.models.weights import SyntheticWeights, build_model, local_experts
from moe_worker.serving.traffic import TrafficSource
from moe_worker.settings import TrafficSettings, settings_from_env, settings_to_env

SHAPE = ModelShape(layers=2, experts=4, hidden=16, ffn_hidden=32, heads=2, head_dim=8, top_k=2)


def random_routing(n: int, experts: int, k: int, seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    return route(torch.randn(n, experts, generator=g), k)


def test_dispatch_then_combine_with_identity_experts_returns_the_input() -> None:
    # One rank; expert 0 has three replicas, so replica splitting is exercised.
    plan = Plan(version=1, slotsPerRank=6, slots=(((0, 1, 0, 2, 3, 0),),))
    dispatcher = LocalDispatcher(Placement.from_plan(plan, 0, 4), 1, 4)
    x_ND = torch.randn(50, 16)
    routing = random_routing(50, 4, 2)
    grouped_nD, meta = dispatcher.dispatch(0, x_ND, routing.topk_ids_NK)
    assert grouped_nD.shape[0] == sum(meta.slot_sizes) == 100
    assert [meta.slot_sizes[s] > 0 for s in (0, 2, 5)] == [True] * 3
    out = dispatcher.combine(grouped_nD, meta, routing.topk_weights_NK)
    torch.testing.assert_close(out, x_ND)


def test_dispatcher_counts_tokens_per_logical_expert() -> None:
    plan = Plan(version=1, slotsPerRank=5, slots=(((0, 1, 2, 3, 0),),))
    dispatcher = LocalDispatcher(Placement.from_plan(plan, 0, 4), 1, 4)
    routing = random_routing(40, 4, 2, seed=3)
    dispatcher.dispatch(0, torch.randn(40, 16), routing.topk_ids_NK)
    expected = torch.bincount(routing.topk_ids_NK.reshape(-1), minlength=4)
    assert torch.equal(dispatcher.counts_LE[0], expected)


@pytest.mark.parametrize("architecture", ["SeedMLP", "Mixtral", "Qwen3MoE"])
def test_single_rank_engine_equals_the_local_experts(architecture: str) -> None:
    source = SyntheticWeights.for_shape(SHAPE.replace(architecture=architecture), seed=1)
    prompts = [[1, 2, 3, 4, 5], [9], [7, 8, 7]]
    cache = KVCache.for_shape(SHAPE, 64)
    batch = StepBatch.build([(i, p, 0) for i, p in enumerate(prompts)])
    experts = local_experts(source)
    with torch.no_grad():
        expected = build_model(source)(batch, cache, experts)
    plan = round_robin_plan(2, 4, 1, slots_per_rank=5)  # a replica of expert 0 too
    engine = EPEngine(source, plan, rank=0)
    torch.testing.assert_close(ep_prefill(engine, prompts, torch.device("cpu")), expected)
    assert torch.equal(engine.counts_LE, experts.counts_LE)
    assert engine.held_experts() == [{0, 1, 2, 3}, {0, 1, 2, 3}]


def test_a_rank_loads_only_its_plans_experts() -> None:
    plan = Plan(version=1, slotsPerRank=2, slots=(((0, 1), (2, 3)), ((3, 3), (0, 1))))
    assert plan_experts(plan, 0) == [(0, 0), (0, 1), (1, 3)]
    asked: list[tuple[int, int]] = []
    source = SyntheticWeights.for_shape(SHAPE)
    expert = source.expert

    def counting(layer: int, e: int):  # type: ignore[no-untyped-def]
        asked.append((layer, e))
        return expert(layer, e)

    source.expert = counting  # type: ignore[method-assign]
    engine = EPEngine(source, plan, rank=1)
    assert sorted(asked) == [(0, 2), (0, 3), (1, 0), (1, 1)]
    assert engine.held_experts() == [{2, 3}, {0, 1}]


def test_gate_bias_moves_selection_but_not_the_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = route(logits, 2)
    biased = route(logits, 2, gate_bias_E=torch.tensor([0.0, -1.0, 1.0, 0.0]))
    assert plain.topk_ids_NK.tolist() == [[0, 1]]
    assert biased.topk_ids_NK.tolist() == [[2, 0]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(biased.topk_weights_NK[0], torch.stack([p[2], p[0]]) / (p[2] + p[0]))


def test_transfers_cover_every_newly_needed_expert_once() -> None:
    old = round_robin_plan(1, 4, 4)
    rotated = Plan(version=2, slotsPerRank=1, slots=(((3,), (0,), (1,), (2,)),))
    assert plan_transfers(old, old) == []
    moves = plan_transfers(old, rotated)
    assert sorted((t.expert, t.src, t.dst) for t in moves) == [
        (0, 0, 1),
        (1, 1, 2),
        (2, 2, 3),
        (3, 3, 0),
    ]
    replicated = Plan(version=3, slotsPerRank=2, slots=(((0, 1), (1, 0), (2, 0), (3, 0)),))
    moves = plan_transfers(old, replicated)
    assert sorted((t.expert, t.dst) for t in moves) == [(0, 1), (0, 2), (0, 3), (1, 0)]


def test_settings_from_the_pod_environment() -> None:
    s = settings_from_env(
        {
            "MOE_POD_NAME": "llm-worker-3",
            "MOE_WORLD_SIZE": "16",
            "MOE_LAYERS": "16",
            "MOE_EXPERTS_PER_LAYER": "16",
            "MOE_DTYPE": "bfloat16",
            "MOE_TRAFFIC_ZIPF": "1.2",
            "MOE_PLAN_PATH": "/etc/moe-ep/plan/plan.json",
            "MOE_KV_CACHE_TOKENS": "4096",
            "MOE_STALL_TIMEOUT": "30",
        }
    )
    assert (s.rank, s.world_size, s.model.layers, s.model.dtype) == (3, 16, 16, "bfloat16")
    assert s.traffic.zipf == 1.2 and s.plan_path == "/etc/moe-ep/plan/plan.json"
    assert (s.kv_cache_tokens, s.stall_timeout) == (4096, 30.0)
    assert s.declared_shape == {"layers", "experts", "dtype"}
    assert settings_from_env({"MOE_POD_NAME": "w-3", "MOE_RANK": "5"}).rank == 5
    assert rank_from_pod_name("worker") is None
    with pytest.raises(ValueError, match="MOE_POD_NAME"):
        settings_from_env({"MOE_POD_NAME": "worker"})
    with pytest.raises(ValueError, match="MOE_KV_CACHE_TOKENS: 'lots' is not an integer"):
        settings_from_env({"MOE_KV_CACHE_TOKENS": "lots"})


def test_settings_travel_through_the_environment_unchanged() -> None:
    s = settings_from_env({"MOE_LAYERS": "3", "MOE_CHECKPOINT": "/ckpt"}).replace(
        rank=2, world_size=4, api_port=0, served_model_name="tiny", traffic=TrafficSettings(2, 8)
    )
    assert settings_from_env(settings_to_env(s)) == s
    assert "MOE_EXPERTS_PER_LAYER" not in settings_to_env(s)  # undeclared: from the checkpoint


def test_zipf_traffic_prompts_favour_low_token_ids() -> None:
    traffic = TrafficSettings(batch=2, seq_len=400, zipf=1.5)
    source = TrafficSource(traffic, vocab_size=64, world_size=2, seed=0)
    again = TrafficSource(traffic, vocab_size=64, world_size=2, seed=0)
    assert source.prompt() == again.prompt()
    tokens = torch.tensor(source.prompt())
    counts = torch.bincount(tokens, minlength=64)
    assert counts[0] > 4 * counts[5] and int(tokens.max()) < 64
    first = source.top_up(now=0.0)
    assert len(first) == 4 and source.in_flight == 4 and not source.due(now=0.05)
    source.done(first[0].request_id)
    assert [r.request_id for r in source.top_up(now=1.0)] == ["traffic-4"]
    uniform = TrafficSource(TrafficSettings(1, 4000), vocab_size=8, world_size=1, seed=0)
    assert torch.bincount(torch.tensor(uniform.prompt()), minlength=8).min() > 400
