"""Parity with transformers (a test-only dependency): tiny random Mixtral, Qwen3-MoE, Qwen2-MoE,
GLM-4.5 and DeepSeek-V3 models made here with transformers' own config classes, saved with
`save_pretrained`, loaded by our code.

Cases cover both checkpoint formats transformers writes (the hub's per-expert tensors by default,
fused [E, ...] expert tensors with `save_original_format=False`), sharding, tied embeddings,
grouped-query attention and Qwen3's explicit head_dim with norm_topk_prob both ways; shared
experts (gated and plain), dense first layers, sigmoid routers with a correction bias and groups,
MLA with low-rank or direct queries, interleaved or half-split RoPE, and YaRN. fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even by accident

import pytest
import torch
from hf_tiny import TINY, deepseek_v3, glm4_moe, prompts, qwen2_moe
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_worker.bench.generator import Generator, Request
from moe_worker.ep.sampling import SamplingParams
from moe_worker.models.checkpoint import HFCheckpoint
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models.weights import build_model, local_experts

ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Any]
    save: dict[str, Any]


CASES = [
    Case(
        "mixtral",
        lambda: MixtralForCausalLM(
            MixtralConfig(**TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
        ),
        {},
    ),
    Case(
        "mixtral-fused-sharded-tied",
        lambda: MixtralForCausalLM(
            MixtralConfig(
                **TINY,
                intermediate_size=32,
                num_local_experts=8,
                num_experts_per_tok=2,
                tie_word_embeddings=True,
            )
        ),
        {"save_original_format": False, "max_shard_size": "64KB"},
    ),
    Case(
        "qwen3-norm-topk",
        lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **TINY,
                head_dim=24,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=3,
                norm_topk_prob=True,
            )
        ),
        {"max_shard_size": "64KB"},
    ),
    Case(
        "qwen3-raw-topk-fused",
        lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **TINY,
                head_dim=24,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=3,
                norm_topk_prob=False,
            )
        ),
        {"save_original_format": False},
    ),
    Case("qwen2-moe", qwen2_moe, {}),
    Case("glm4-moe-fused", glm4_moe, {"save_original_format": False}),
    Case("deepseek-v3-sharded", deepseek_v3, {"max_shard_size": "64KB"}),
    Case(
        "deepseek-v3-yarn-direct-q",
        lambda: deepseek_v3(
            q_lora_rank=None,
            rope_interleave=False,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "mscale": 0.8,
                "mscale_all_dim": 1.0,
            },
        ),
        {"save_original_format": False},
    ),
]


@dataclass
class Loaded:
    case: Case
    hf: Any
    checkpoint: HFCheckpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls on shared cores: one thread is several times faster than contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    case: Case = request.param
    torch.manual_seed(0)
    hf = case.make().eval()
    hf.generation_config.eos_token_id = None  # compare whole generations
    path: Path = tmp_path_factory.mktemp(case.name)
    hf.save_pretrained(path, **case.save)
    return Loaded(case, hf, HFCheckpoint(path))


def test_the_checkpoint_is_in_the_format_the_case_says(loaded: Loaded) -> None:
    save = loaded.case.save
    keys = loaded.checkpoint.keys()
    fused = any(k.endswith("experts.gate_up_proj") for k in keys)
    per_expert = any(".experts.0." in k for k in keys)
    assert (fused, per_expert) == (
        (True, False) if "save_original_format" in save else (False, True)
    )
    assert (loaded.checkpoint.path / "model.safetensors.index.json").exists() == (
        "max_shard_size" in save
    )


def test_logits_equal_transformers(loaded: Loaded) -> None:
    model, experts = build_model(loaded.checkpoint), local_experts(loaded.checkpoint)
    texts = prompts(5, 17, 1, 11)
    cache = KVCache.for_shape(loaded.checkpoint.spec.shape, 64, block_size=8)
    with torch.no_grad():
        batch = StepBatch.build([(i, t, 0) for i, t in enumerate(texts)])
        ours_all = model(batch, cache, experts, all_positions=True)
        for i, text in enumerate(texts):
            theirs = loaded.hf(torch.tensor([text])).logits[0]
            span = batch.spans[i]
            ours = ours_all[span.start : span.start + span.length]
            assert (ours - theirs).abs().max().item() < ATOL
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_greedy_generation_equals_generate(loaded: Loaded) -> None:
    new_tokens = 20
    texts = prompts(6, 13, seed=1)
    generator = Generator.from_source(loaded.checkpoint, 128, keep_logits=True)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ours = generator.generate(Request(i, tuple(t), greedy) for i, t in enumerate(texts))
    for i, text in enumerate(texts):
        out = loaded.hf.generate(
            torch.tensor([text]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        theirs = out.sequences[0, len(text) :].tolist()
        assert len(theirs) == new_tokens
        assert ours[i].token_ids == theirs
        assert ours[i].finish_reason == "length"
        theirs_logits = torch.cat(out.logits)
        assert (torch.stack(ours[i].logits) - theirs_logits).abs().max().item() < ATOL


def test_a_mixed_batch_equals_each_request_alone(loaded: Loaded) -> None:
    lengths, max_tokens = (3, 29, 9, 17, 1), (12, 6, 10, 8, 14)
    requests = [
        Request(i, tuple(t), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        for i, (t, m) in enumerate(zip(prompts(*lengths, seed=2), max_tokens, strict=True))
    ]
    batched = Generator.from_source(loaded.checkpoint, 256, max_step_tokens=8, keep_logits=True)
    steps: list[list[tuple[int, int]]] = []
    prepare = batched.cache.prepare

    def recording_prepare(batch: StepBatch) -> StepMeta:
        steps.append([(s.length, s.position) for s in batch.spans])
        return prepare(batch)

    batched.cache.prepare = recording_prepare  # type: ignore[method-assign]
    together = batched.generate(requests)
    # Prompts were chunked, and some steps prefilled while others decoded.
    assert any(any(n > 1 for n, _ in s) and any(n == 1 and p > 0 for n, p in s) for s in steps)
    assert any(any(n > 1 and p > 0 for n, p in s) for s in steps)
    for request in requests:
        alone = Generator.from_source(loaded.checkpoint, 64, keep_logits=True)
        single = alone.generate([request])[request.request_id]
        assert together[request.request_id].token_ids == single.token_ids
        torch.testing.assert_close(
            torch.stack(together[request.request_id].logits),
            torch.stack(single.logits),
            atol=1e-5,
            rtol=0,
        )
    assert batched.cache.free_tokens == batched.cache.capacity_tokens  # everything was freed
