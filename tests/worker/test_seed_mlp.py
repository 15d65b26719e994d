"""SeedMLP and the pieces every architecture shares: synthetic weights, the KV-cache step, routing,
zero-token steps, the reference experts and the EP hook."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.ep.dispatch import LocalDispatcher, Placement
from moe_worker.models import ExpertWeights, MoETransformer, Routing, architecture, route
from moe_worker.models.base import generator_for
from moe_worker.models.kv_cache import KVCache, KVCacheFull, StepBatch
from moe_worker.models.weights import SyntheticWeights, build_model, local_experts

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, kv_heads=2, vocab_size=96
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls on shared cores: one thread is several times faster than contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["SeedMLP", "Mixtral", "Qwen3MoE"])
def source(request: pytest.FixtureRequest) -> SyntheticWeights:
    return SyntheticWeights.for_shape(SHAPE.replace(architecture=request.param), seed=3)


def run(model: MoETransformer, moe, cache: KVCache, items, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(StepBatch.build(items), cache, moe, **kwargs)


def test_synthetic_weights_are_identical_across_constructions(source: SyntheticWeights) -> None:
    again = SyntheticWeights(source.spec, seed=3)
    first, second = build_model(source).state_dict(), build_model(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(source.expert(1, 2).flat(), again.expert(1, 2).flat())
    assert not torch.equal(source.expert(1, 2).flat(), source.expert(1, 3).flat())
    other_seed = SyntheticWeights(source.spec, seed=4)
    assert not torch.equal(source.expert(1, 2).flat(), other_seed.expert(1, 2).flat())


def test_seed_mlp_experts_are_the_seed_models_experts() -> None:
    """The retired seed model drew expert e of layer l as N(0, 1/fan_in) keyed by
    `layers.{l}.experts.{e}.w_in`: synthetic SeedMLP experts are those same weights."""
    source = SyntheticWeights.for_shape(SHAPE, seed=5)
    ours = source.expert(1, 3)
    w_in = torch.randn(48, 32, generator=generator_for(5, "layers.1.experts.3.w_in")) / 32**0.5
    w_out = torch.randn(32, 48, generator=generator_for(5, "layers.1.experts.3.w_out")) / 48**0.5
    assert torch.equal(ours.matrices[0], w_in)
    assert torch.equal(ours.matrices[1], w_out)


def test_kv_cache_steps_equal_a_full_recompute(source: SyntheticWeights) -> None:
    model, experts = build_model(source), local_experts(source)
    prompt = torch.randint(0, SHAPE.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    full_cache = KVCache.for_shape(SHAPE, 64)
    full = run(model, experts, full_cache, [("s", prompt.tolist(), 0)], all_positions=True)
    cache = KVCache.for_shape(SHAPE, 64, block_size=4)  # chunks straddle block boundaries
    pieces, start = [], 0
    for size in (7, 5, 1, 1, 6):  # a prompt in chunks, then decode steps, then a chunk again
        tokens = prompt[start : start + size].tolist()
        pieces.append(run(model, experts, cache, [("s", tokens, start)], all_positions=True))
        start += size
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=0)
    assert cache.length("s") == 20


def test_sequences_in_one_step_do_not_see_each_other(source: SyntheticWeights) -> None:
    model, experts = build_model(source), local_experts(source)
    a, b, c = [list(range(i, i + n)) for i, n in ((1, 9), (20, 4), (40, 1))]
    together_cache = KVCache.for_shape(SHAPE, 128)
    together = run(model, experts, together_cache, [("a", a, 0), ("b", b, 0), ("c", c, 0)])
    for row, (name, tokens) in enumerate((("a", a), ("b", b), ("c", c))):
        alone = run(model, experts, KVCache.for_shape(SHAPE, 128), [(name, tokens, 0)])
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)


def test_a_zero_token_step_still_calls_every_moe_layer(source: SyntheticWeights) -> None:
    model, experts = build_model(source), local_experts(source)
    calls: list[tuple[int, int]] = []

    def spy(layer: int, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        calls.append((layer, x_ND.shape[0]))
        return experts(layer, x_ND, routing)

    logits = run(model, spy, KVCache.for_shape(SHAPE, 16), [])
    assert logits.shape == (0, SHAPE.vocab_size)
    assert calls == [(0, 0), (1, 0)]


def test_gate_bias_moves_the_models_routing_per_layer(source: SyntheticWeights) -> None:
    model, items = build_model(source), [("a", list(range(12)), 0)]
    plain = local_experts(source)
    run(model, plain, KVCache.for_shape(SHAPE, 32), items)
    rare = int(plain.counts_LE[1].argmin())
    gate_bias_LE = torch.zeros(SHAPE.layers, SHAPE.experts)
    gate_bias_LE[1, rare] = 2.0  # more than any probability gap: every token of layer 1 visits it
    biased = local_experts(source)
    run(model, biased, KVCache.for_shape(SHAPE, 32), items, gate=gate_bias_LE)
    assert plain.counts_LE[1, rare] < 12 and biased.counts_LE[1, rare] == 12
    assert torch.equal(biased.counts_LE[0], plain.counts_LE[0])  # layer 0 has no bias


def test_the_existing_local_dispatcher_runs_the_experts_too(source: SyntheticWeights) -> None:
    """The EP hook: the dispatch/combine path (all-to-all in EP) equals the local experts."""
    model, experts = build_model(source), local_experts(source)
    arch = source.arch
    plan = round_robin_plan(SHAPE.layers, SHAPE.experts, 1, slots_per_rank=SHAPE.experts)
    dispatcher = LocalDispatcher(Placement.from_plan(plan, 0, SHAPE.experts), 2, SHAPE.experts)

    def dispatched(layer: int, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        grouped_nD, meta = dispatcher.dispatch(layer, x_ND, routing.topk_ids_NK)
        held = experts.experts[layer]  # slot s of the only rank holds plan.slots[layer][0][s]
        slots = plan.slots[layer][0]
        chunks = grouped_nD.split(meta.slot_sizes)
        outputs = [arch.expert_forward(x, held[e]) for x, e in zip(chunks, slots, strict=True)]
        return dispatcher.combine(torch.cat(outputs), meta, routing.topk_weights_NK)

    items = [("a", [5, 6, 7, 8], 0), ("b", [9], 0)]
    local = run(model, experts, KVCache.for_shape(SHAPE, 32), items)
    ep = run(model, dispatched, KVCache.for_shape(SHAPE, 32), items)
    torch.testing.assert_close(ep, local, atol=1e-6, rtol=0)
    assert torch.equal(dispatcher.counts_LE, experts.counts_LE)


def test_local_experts_count_routed_tokens() -> None:
    source = SyntheticWeights.for_shape(SHAPE)
    experts = local_experts(source)
    routing = route(torch.randn(30, SHAPE.experts), 2)
    experts(1, torch.randn(30, SHAPE.hidden), routing)
    expected = torch.bincount(routing.topk_ids_NK.reshape(-1), minlength=SHAPE.experts)
    assert torch.equal(experts.counts_LE[1], expected)
    assert experts.counts_LE[0].sum() == 0


def test_one_expert_moe_equals_the_expert() -> None:
    source = SyntheticWeights.for_shape(SHAPE.replace(experts=1, top_k=1, architecture="Mixtral"))
    experts = local_experts(source)
    x_ND = torch.randn(7, SHAPE.hidden)
    y = experts(0, x_ND, route(torch.randn(7, 1), 1))
    torch.testing.assert_close(y, source.arch.expert_forward(x_ND, experts.experts[0][0]))


def test_routing_is_the_seeds_and_gate_bias_moves_selection_only() -> None:
    logits_NE = torch.randn(50, 6)
    ours = route(logits_NE, 2)
    probs_NE = torch.softmax(logits_NE, -1)
    top_NK = probs_NE.topk(2, dim=-1)
    assert torch.equal(ours.topk_ids_NK, top_NK.indices)
    torch.testing.assert_close(ours.topk_weights_NK, top_NK.values / top_NK.values.sum(-1, True))
    one = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    biased = route(one, 2, gate_bias_E=torch.tensor([0.0, -1.0, 1.0, 0.0]))
    assert biased.topk_ids_NK.tolist() == [[2, 0]]
    probs = torch.softmax(one, -1)[0]
    expected = torch.stack([probs[2], probs[0]]) / (probs[2] + probs[0])
    torch.testing.assert_close(biased.topk_weights_NK[0], expected)
    raw = route(one, 2, normalize=False)
    torch.testing.assert_close(raw.topk_weights_NK[0], probs[:2])


def test_expert_weights_travel_as_one_flat_buffer() -> None:
    arch = architecture("Qwen3MoE")
    weights = SyntheticWeights.for_shape(SHAPE.replace(architecture="Qwen3MoE")).expert(0, 1)
    flat = weights.flat()
    assert flat.numel() == SHAPE.replace(architecture="Qwen3MoE").expert_params
    back = ExpertWeights.from_flat(flat, arch.expert_shapes(SHAPE))
    assert all(torch.equal(a, b) for a, b in zip(back.matrices, weights.matrices, strict=True))


def test_kv_cache_budget_allocates_frees_and_refuses_when_full() -> None:
    cache = KVCache.for_shape(SHAPE, 64, block_size=16)
    cache.reserve("a", 20)  # two blocks
    cache.reserve("b", 16)
    assert cache.free_tokens == 16
    with pytest.raises(KVCacheFull, match="needs 40 tokens"):
        cache.reserve("c", 40)
    assert "c" not in cache and cache.free_tokens == 16  # all or nothing
    with pytest.raises(KVCacheFull, match="raise kv_cache_tokens"):
        cache.prepare(StepBatch.build([("d", list(range(17)), 0)]))
    assert cache.free_tokens == 16
    cache.free("a")
    assert cache.free_tokens == 48
    cache.prepare(StepBatch.build([("d", list(range(17)), 0)]))
    assert cache.length("d") == 17 and cache.free_tokens == 16
    with pytest.raises(ValueError, match="only 17 tokens are cached"):
        cache.prepare(StepBatch.build([("d", [1], 18)]))
