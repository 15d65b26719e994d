"""The MoE blocks of Qwen2-MoE, GLM-4.5 and DeepSeek-V3 beyond whole-model parity
(test_hf_parity, test_ep_parity): the sigmoid router against transformers' own router module,
the plan's gate bias composed with the checkpoint's correction bias, shared experts and dense
layers kept out of plans and counters, and MLA's cache layout. In-process, fp32."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even by accident

import pytest
import torch
from hf_tiny import deepseek_v3, prompts, qwen2_moe
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moe_contract.plan import Plan, PlanError, round_robin_plan, validate_plan
from moe_contract.shape import ModelShape
from moe_worker.models import Routing, route, route_priced
from moe_worker.models.checkpoint import CheckpointError, HFCheckpoint
from moe_worker.models.config import RouterSpec
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.models.weights import SyntheticWeights, build_model, local_experts
from moe_worker.runtime.loading import ShapeMismatch, open_weights
from moe_worker.settings import WorkerSettings

SIGMOID = RouterSpec("sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)


def sigmoid_case(tokens: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, 16] and a correction bias [16] of the size of the scores' spread."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 16, generator=g), torch.randn(16, generator=g) * 0.2


def as_sets(routing: Routing) -> list[dict[int, float]]:
    """Each token's expert -> weight (transformers' top-K is unsorted)."""
    return [
        dict(zip(ids.tolist(), weights.tolist(), strict=True))
        for ids, weights in zip(routing.topk_ids_NK, routing.topk_weights_NK, strict=True)
    ]


@pytest.mark.parametrize("norm", [True, False])
def test_the_sigmoid_router_equals_transformers_router(norm: bool) -> None:
    config = DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    theirs = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(16, 32, generator=g) * 0.3)
        theirs.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.2)
        _, weights, ids = theirs(x)
        logits = x @ theirs.weight.T
    ours = route(
        logits, 3, normalize=norm, router=SIGMOID, correction_E=theirs.e_score_correction_bias
    )
    expected = as_sets(Routing(ids, weights))
    for got, want in zip(as_sets(ours), expected, strict=True):
        assert got.keys() == want.keys()
        assert all(abs(got[e] - want[e]) < 1e-6 for e in got)


def test_the_correction_bias_moves_the_choice_but_never_the_weights() -> None:
    logits, correction = sigmoid_case()
    plain = route(logits, 3, router=SIGMOID, normalize=False)
    corrected = route(logits, 3, router=SIGMOID, normalize=False, correction_E=correction)
    assert not torch.equal(plain.topk_ids_NK, corrected.topk_ids_NK)
    scores = logits.sigmoid()
    # weights are the chosen experts' own sigmoid scores (times the scale), bias or not
    for routing in (plain, corrected):
        expected = scores.gather(1, routing.topk_ids_NK) * 2.5
        torch.testing.assert_close(routing.topk_weights_NK, expected)


def test_experts_are_chosen_within_the_best_groups_only() -> None:
    logits, correction = sigmoid_case(tokens=200)
    routing = route(logits, 3, router=SIGMOID, correction_E=correction)
    groups = routing.topk_ids_NK // 4  # 16 experts in 4 groups of 4
    assert max(len(set(row.tolist())) for row in groups) == 2  # topk_group 2
    ungrouped = route(logits, 3, router=RouterSpec("sigmoid"), correction_E=correction)
    assert max(len(set(row.tolist())) for row in ungrouped.topk_ids_NK // 4) == 3


def test_a_plan_bias_adds_to_the_correction_bias() -> None:
    logits, correction = sigmoid_case(tokens=200)
    plan_bias = torch.zeros(16)
    plan_bias[[0, 5, 9]] = 0.3  # pull three experts
    biased, reroutes = route_priced(
        logits, 3, router=SIGMOID, correction_E=correction, gate_bias_E=plan_bias
    )
    composed = route(logits, 3, router=SIGMOID, correction_E=correction + plan_bias)
    assert torch.equal(biased.topk_ids_NK, composed.topk_ids_NK)
    torch.testing.assert_close(biased.topk_weights_NK, composed.topk_weights_NK)
    own = route(logits, 3, router=SIGMOID, correction_E=correction)
    moved = [
        len(set(b.tolist()) - set(o.tolist()))
        for b, o in zip(biased.topk_ids_NK, own.topk_ids_NK, strict=True)
    ]
    assert reroutes.rerouted_N.tolist() == moved and sum(moved) > 0
    # the price is in sigmoid scores: what the model's own choice had over the biased one
    scores = logits.sigmoid()
    lost = scores.gather(1, own.topk_ids_NK).sum(-1) - scores.gather(1, biased.topk_ids_NK).sum(-1)
    torch.testing.assert_close(reroutes.lost_weight_N, lost.clamp_min(0))


def test_the_guard_keeps_every_confident_token_on_the_models_choice() -> None:
    logits, correction = sigmoid_case(tokens=400)
    plan_bias = torch.full((16,), -0.5)
    plan_bias[3] = 0.5
    margin = 0.05
    guarded = route(
        logits,
        3,
        router=SIGMOID,
        correction_E=correction,
        gate_bias_E=plan_bias,
        max_margin=margin,
    )
    own = route(logits, 3, router=SIGMOID, correction_E=correction)
    changed = [
        set(g.tolist()) != set(o.tolist())
        for g, o in zip(guarded.topk_ids_NK, own.topk_ids_NK, strict=True)
    ]
    unguarded = route(logits, 3, router=SIGMOID, correction_E=correction, gate_bias_E=plan_bias)
    assert sum(changed) < sum(
        set(u.tolist()) != set(o.tolist())
        for u, o in zip(unguarded.topk_ids_NK, own.topk_ids_NK, strict=True)
    )
    kth, following = own_margin(logits, correction)
    for row, moved in enumerate(changed):
        if moved:
            assert kth[row] - following[row] < margin


def own_margin(logits: torch.Tensor, correction: torch.Tensor) -> tuple[list[float], list[float]]:
    """The K-th and (K+1)-th of each token's own selection scores within its best groups."""
    from moe_worker.models.routing import group_limited

    own = group_limited(logits.sigmoid() + correction, 4, 2)
    values = own.topk(4, dim=-1).values
    return values[:, 2].tolist(), values[:, 3].tolist()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> HFCheckpoint:
    torch.manual_seed(0)
    with torch.no_grad():
        hf = deepseek_v3()
    path: Path = tmp_path_factory.mktemp("deepseek")
    hf.save_pretrained(path)
    return HFCheckpoint(path)


def test_shared_experts_are_never_part_of_a_plan(deepseek: HFCheckpoint) -> None:
    shape = deepseek.spec.shape
    assert (shape.dense_layers, shape.layers, shape.experts) == (1, 2, 8)  # 3 blocks, 8 routed
    plan = round_robin_plan(shape.layers, shape.experts, 2, 4)
    assert sorted({e for layer in plan.slots for rank in layer for e in rank}) == list(range(8))
    shared = Plan(version=2, slotsPerRank=5, slots=[[[0, 1, 2, 3, 8], [4, 5, 6, 7, 0]]] * 2)
    with pytest.raises(PlanError, match="expert"):
        validate_plan(shared, num_layers=shape.layers, num_experts=shape.experts, world_size=2)
    with pytest.raises(CheckpointError, match="expert 8"):
        deepseek.expert(0, shape.experts)  # no routed expert stands for the shared ones
    # every rank's dense model holds the shared experts of each MoE block, and the dense MLP
    names = set(build_model(deepseek).state_dict())
    for block in (1, 2):
        assert f"layers.{block}.mlp.shared_experts.gate_proj.weight" in names
        assert f"layers.{block}.gate.e_score_correction_bias" in names
    assert "layers.0.mlp.gate_proj.weight" in names and "layers.0.gate.weight" not in names


def test_only_routed_experts_are_counted_and_dense_layers_never_call_them(
    deepseek: HFCheckpoint,
) -> None:
    model, experts = build_model(deepseek), local_experts(deepseek)
    calls: list[tuple[int, int]] = []

    def recording(layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        calls.append((layer, x.shape[0]))
        return experts(layer, x, routing)

    texts = prompts(5, 9)
    cache = KVCache.for_shape(deepseek.spec.shape, 64, block_size=8)
    with torch.no_grad():
        model(StepBatch.build([(i, t, 0) for i, t in enumerate(texts)]), cache, recording)
    assert calls == [(0, 14), (1, 14)]  # MoE layers 0 and 1 (blocks 1 and 2), never block 0
    assert experts.counts_LE.shape == (2, 8)
    assert experts.counts_LE.sum(-1).tolist() == [14 * 3, 14 * 3]  # tokens x top-3, no shared


def test_a_gated_shared_expert_is_dense_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qwen2_moe().save_pretrained(tmp_path)
    checkpoint = HFCheckpoint(tmp_path)
    assert checkpoint.spec.shape.shared_ffn_hidden == 48 and checkpoint.spec.shape.experts == 8
    names = set(build_model(checkpoint).state_dict())
    assert names >= {
        "layers.0.mlp.shared_expert_gate.weight",
        "layers.1.mlp.shared_expert.up_proj.weight",
        "layers.0.self_attn.q_proj.bias",
    }


def test_the_mla_cache_holds_the_latent_and_the_rotary_key_per_token() -> None:
    mla = ModelShape(
        layers=2,
        experts=8,
        hidden=64,
        ffn_hidden=32,
        heads=4,
        head_dim=24,
        top_k=2,
        architecture="DeepseekV3",
        dense_layers=1,
        dense_ffn_hidden=96,
        shared_ffn_hidden=32,
        kv_lora_rank=16,
        q_lora_rank=24,
        rope_head_dim=8,
        v_head_dim=12,
    )
    cache = KVCache.for_shape(mla, 64, block_size=16)
    assert cache.k_LPHd.shape == (3, 64, 1, 16 + 8) and cache.v_LPHd is None  # every block
    per_token_layer = cache.k_LPHd[0, 0].numel() * cache.k_LPHd.element_size()
    assert per_token_layer == mla.kv_bytes_per_token_layer == (16 + 8) * 4
    gqa = mla.replace(architecture="Glm4MoE", kv_heads=2, **dict.fromkeys(MLA_FIELDS, 0))
    assert gqa.kv_bytes_per_token_layer == 2 * 2 * 24 * 4


MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim")


@pytest.mark.parametrize("architecture", ["Qwen2MoE", "Glm4MoE", "DeepseekV3"])
def test_synthetic_weights_serve_every_new_family(architecture: str) -> None:
    extra: dict[str, int] = {"shared_ffn_hidden": 24}
    if architecture != "Qwen2MoE":
        extra |= {"dense_layers": 1, "dense_ffn_hidden": 48}
    if architecture == "DeepseekV3":
        extra |= {"kv_lora_rank": 16, "rope_head_dim": 8, "v_head_dim": 8, "head_dim": 24}
    shape = ModelShape(
        layers=2, experts=4, hidden=32, ffn_hidden=16, architecture=architecture, **extra
    )
    source = SyntheticWeights.for_shape(shape, seed=3)
    model, experts = build_model(source), local_experts(source)
    cache = KVCache.for_shape(source.spec.shape, 64, block_size=8)
    with torch.no_grad():
        logits = model(StepBatch.build([(0, [1, 2, 3], 0)]), cache, experts)
        step = model(StepBatch.build([(0, [int(logits.argmax())], 3)]), cache, experts)
    assert torch.isfinite(step).all() and experts.counts_LE.sum() == 4 * 2 * 2


def test_a_declared_size_that_disagrees_with_config_json_names_both_values(
    deepseek: HFCheckpoint,
) -> None:
    settings = WorkerSettings(checkpoint=str(deepseek.path)).replace(
        model=deepseek.spec.shape.replace(kv_lora_rank=32, dense_layers=2),
        declared_shape=frozenset({"kv_lora_rank", "dense_layers", "layers"}),
    )
    with pytest.raises(ShapeMismatch) as refused:
        open_weights(settings)
    message = str(refused.value)
    assert "kv_lora_rank: the MoEDeployment says 32" in message and "says 16" in message
    assert "dense_layers: the MoEDeployment says 2" in message and "says 1" in message
    _, served = open_weights(settings.replace(model=deepseek.spec.shape))
    assert served.model == deepseek.spec.shape
