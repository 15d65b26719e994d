"""Single-process properties of the model, the dispatcher, plan transfers, settings and traffic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_worker.dispatch import LocalDispatcher, Placement
from moe_worker.engine import EPEngine
from moe_worker.env import rank_from_pod_name
from moe_worker.model import (
    DenseExperts,
    ExpertSource,
    Routing,
    expert_mlp,
    init_expert,
    reference_forward,
    route,
    write_checkpoint,
)
from moe_worker.plan import Plan, plan_transfers, round_robin_plan
from moe_worker.settings import TrafficSettings, settings_from_env
from moe_worker.shape import ModelShape
from moe_worker.traffic import TrafficSource, zipf_logit_offset

CONFIG = ModelShape(layers=2, experts=4, hidden=16, ffn_hidden=32, heads=2, head_dim=8, top_k=2)


def random_routing(n: int, experts: int, k: int, seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    return route(torch.randn(n, experts, generator=g), k)


def test_dispatch_then_combine_with_identity_experts_returns_the_input() -> None:
    # One rank; expert 0 has three replicas, so replica splitting is exercised.
    plan = Plan(version=1, slotsPerRank=6, slots=(((0, 1, 0, 2, 3, 0),),))
    dispatcher = LocalDispatcher(Placement.from_plan(plan, 0, 4), 1, 4)
    x_ND = torch.randn(50, 16)
    routing = random_routing(50, 4, 2)
    chunks, meta = dispatcher.dispatch(0, x_ND, routing.topk_ids_NK)
    assert sum(c.shape[0] for c in chunks) == 100
    assert [c.shape[0] > 0 for c in (chunks[0], chunks[2], chunks[5])] == [True] * 3
    out = dispatcher.combine(chunks, meta, routing.topk_weights_NK)
    torch.testing.assert_close(out, x_ND)


def test_dispatcher_counts_tokens_per_logical_expert() -> None:
    plan = Plan(version=1, slotsPerRank=5, slots=(((0, 1, 2, 3, 0),),))
    dispatcher = LocalDispatcher(Placement.from_plan(plan, 0, 4), 1, 4)
    routing = random_routing(40, 4, 2, seed=3)
    dispatcher.dispatch(0, torch.randn(40, 16), routing.topk_ids_NK)
    expected = torch.bincount(routing.topk_ids_NK.reshape(-1), minlength=4)
    assert torch.equal(dispatcher.counts_LE[0], expected)


def test_one_expert_moe_equals_the_dense_mlp() -> None:
    config = ModelShape(
        layers=1, experts=1, hidden=16, ffn_hidden=32, heads=2, head_dim=8, top_k=1
    )
    x_ND = torch.randn(30, 16)
    routing = route(torch.randn(30, 1), 1)
    dense = expert_mlp(x_ND, init_expert(config, 0, 0, 0))
    torch.testing.assert_close(DenseExperts(ExpertSource(config, 0))(0, x_ND, routing), dense)
    engine = EPEngine(config, round_robin_plan(1, 1, 1), rank=0)
    torch.testing.assert_close(engine(0, x_ND, routing), dense)


def test_single_rank_engine_equals_reference() -> None:
    x = torch.randn(3, 5, 16)
    expected, counts = reference_forward(CONFIG, x, seed=1)
    engine = EPEngine(CONFIG, round_robin_plan(2, 4, 1, slots_per_rank=4), rank=0, seed=1)
    torch.testing.assert_close(engine.forward(x), expected, atol=1e-5, rtol=0)
    assert torch.equal(engine.counts_LE, counts)


def test_gate_bias_moves_selection_but_not_the_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = route(logits, 2)
    biased = route(logits, 2, torch.tensor([0.0, -1.0, 1.0, 0.0]))
    assert plain.topk_ids_NK.tolist() == [[0, 1]]
    assert biased.topk_ids_NK.tolist() == [[2, 0]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(biased.topk_weights_NK[0], torch.stack([p[2], p[0]]) / (p[2] + p[0]))


def test_weights_are_deterministic_per_layer_and_expert() -> None:
    a, b = init_expert(CONFIG, 5, 1, 2), init_expert(CONFIG, 5, 1, 2)
    assert torch.equal(a.w_in_FD, b.w_in_FD)
    assert not torch.equal(a.w_in_FD, init_expert(CONFIG, 5, 1, 3).w_in_FD)
    assert not torch.equal(a.w_in_FD, init_expert(CONFIG, 6, 1, 2).w_in_FD)


def test_checkpoint_has_one_tensor_per_expert_and_loads_the_same_model(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = write_checkpoint(tmp_path / "model.safetensors", CONFIG, seed=4)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert {f"layers.1.experts.{e}.w_in" for e in range(4)} <= keys
    x = torch.randn(2, 4, 16)
    from_init, _ = reference_forward(CONFIG, x, seed=4)
    from_file, _ = reference_forward(CONFIG, x, seed=999, checkpoint=str(path))
    torch.testing.assert_close(from_file, from_init)


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
        }
    )
    assert (s.rank, s.world_size, s.model.layers, s.model.dtype) == (3, 16, 16, "bfloat16")
    assert s.traffic.zipf == 1.2 and s.plan_path == "/etc/moe-ep/plan/plan.json"
    assert settings_from_env({"MOE_POD_NAME": "w-3", "MOE_RANK": "5"}).rank == 5
    assert rank_from_pod_name("worker") is None
    with pytest.raises(ValueError, match="MOE_POD_NAME"):
        settings_from_env({"MOE_POD_NAME": "worker"})


def test_zipf_traffic_skews_routing_towards_low_experts() -> None:
    assert zipf_logit_offset(4, 0.0) is None
    offset = zipf_logit_offset(8, 1.5)
    assert offset is not None and torch.all(offset[:-1] > offset[1:])
    source = TrafficSource(CONFIG, TrafficSettings(batch=2, seq_len=3), rank=1, seed=0)
    assert torch.equal(source.batch(5), source.batch(5))
    assert not torch.equal(source.batch(5), source.batch(6))
    logits = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    skewed = torch.bincount(route(logits + offset, 2).topk_ids_NK.reshape(-1), minlength=8)
    assert skewed[0] > 3 * skewed[7]
