"""Parity with transformers through the distributed serving runtime: tiny random Mixtral,
Qwen3-MoE, Qwen2-MoE (gated shared expert), GLM-4.5 and DeepSeek-V3 (dense first layer, shared
experts, sigmoid router with correction bias and groups; DeepSeek-V3 with MLA) made here with
transformers' own config classes and `save_pretrained`, served by moe-ep at EP world 1, 2 and 4
(gloo, forked ranks, the leader driven through its Backend).

Per world: last-position logits through the EP engine equal transformers' (max abs difference
<= 1e-5 in fp32), in one batch and as two overlapped micro-batches; the group serves with
two-batch overlap on: greedy generation of 20 tokens equals `generate()` token for token; 72
greedy tokens equal `generate()`'s across a Replace plan switch (replicas added, one more slot
per rank, experts moved in the background while generation goes on, then flipped) in the middle
of generation; a batch of mixed-length requests (chunked prefill mixed with decodes, prompt
chunks cut between micro-batches) equals each request alone.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even by accident

import pytest
import torch
from hf_tiny import TINY, deepseek_v3, glm4_moe, prompts, qwen2_moe
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from worker_harness import run_world
from worker_serving_cases import Driver, greedy, logits_of, replace_plan, serve_group

from moe_worker.settings import WorkerSettings

pytestmark = pytest.mark.distributed

ATOL = 1e-5
NEW_TOKENS = 20
SWITCH_TOKENS = 72


def mixtral() -> Any:
    config = MixtralConfig(**TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    return MixtralForCausalLM(config)


def qwen3() -> Any:
    config = Qwen3MoeConfig(
        **TINY,
        head_dim=24,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
    )
    return Qwen3MoeForCausalLM(config)


LOGIT_PROMPTS = prompts(5, 17, 1, 11, seed=0)
GREEDY_PROMPTS = prompts(6, 13, 9, seed=1)
SWITCH_PROMPTS = prompts(7, 12, seed=3)
MIXED = list(zip(prompts(3, 29, 9, 17, 1, seed=2), (12, 6, 10, 8, 16), strict=True))


@dataclass
class Reference:
    """transformers' answers, computed once in the test process (the forked ranks inherit it)."""

    path: Path
    logits: list[torch.Tensor]
    greedy: list[list[int]]
    switch: list[list[int]]
    mixed: list[list[int]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(hf: Any, prompt: list[int], new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


ARCHITECTURES = [mixtral, qwen3, qwen2_moe, glm4_moe, deepseek_v3]


@pytest.fixture(
    scope="module",
    params=ARCHITECTURES,
    ids=["mixtral", "qwen3-moe", "qwen2-moe", "glm4-moe", "deepseek-v3"],
)
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    torch.manual_seed(0)
    with torch.no_grad():
        hf = request.param().eval()
    hf.generation_config.eos_token_id = None  # compare whole generations
    path = tmp_path_factory.mktemp(request.param.__name__)
    hf.save_pretrained(path)
    with torch.no_grad():
        logits = [hf(torch.tensor([p])).logits[0, -1] for p in LOGIT_PROMPTS]
    return Reference(
        path,
        logits,
        [generate(hf, p, NEW_TOKENS) for p in GREEDY_PROMPTS],
        [generate(hf, p, SWITCH_TOKENS) for p in SWITCH_PROMPTS],
        [generate(hf, p, n) for p, n in MIXED],
    )


def lead(driver: Driver) -> dict[str, Any]:
    """The leader's script: greedy, a switch mid-generation, a mixed batch and each alone."""
    results: dict[str, Any] = {}
    outcomes = driver.run([greedy(p, NEW_TOKENS) for p in GREEDY_PROMPTS])
    results["greedy"] = [o.tokens for o in outcomes]
    results["finish"] = [o.finish for o in outcomes]

    running = [driver.submit(*greedy(p, SWITCH_TOKENS)) for p in SWITCH_PROMPTS]
    while min(len(o.tokens) for o in running) < 8:
        assert not any(o.done.is_set() for o in running)
        running[0].done.wait(0.01)
    plan = driver.backend.current_plan()
    assert plan is not None
    experts = driver.runtime.settings.model.experts
    new_plan = replace_plan(plan, plan.version + 1, experts)
    answer = driver.backend.switch_plan(new_plan, timeout=120)
    results["switch_answer"] = answer.to_document()
    results["tokens_at_switch"] = [len(o.tokens) for o in running]
    for outcome in running:
        assert outcome.done.wait(300)
    results["switch"] = [o.tokens for o in running]
    results["served_after"] = driver.backend.current_plan() == new_plan

    together = driver.run([greedy(p, n) for p, n in MIXED])
    results["mixed"] = [o.tokens for o in together]
    results["alone"] = [driver.run([greedy(p, n)])[0].tokens for p, n in MIXED]
    return results


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def served(
    request: pytest.FixtureRequest, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    settings = WorkerSettings(
        checkpoint=str(reference.path),
        kv_cache_tokens=256,
        max_batch_tokens=8,
        two_batch_overlap=True,
        background_switch=True,
    )
    body = functools.partial(
        serve_group, settings=settings, lead=lead, before=logits_of(LOGIT_PROMPTS)
    )
    return world, run_world(body, world, Path(tmp_path_factory.mktemp(f"world{world}")), 600)


@pytest.mark.parametrize("key", ["logits", "logits_two_batch"])
def test_last_position_logits_equal_transformers(
    reference: Reference, served: tuple[int, list[dict[str, Any]]], key: str
) -> None:
    world, ranks = served
    ours = {int(i): torch.tensor(v) for r in ranks for i, v in r[key].items()}
    assert sorted(ours) == list(range(len(LOGIT_PROMPTS)))
    diffs = [float((ours[i] - reference.logits[i]).abs().max()) for i in ours]
    print(f"{reference.path.name} world {world} {key}: max logit difference {max(diffs):.2e}")
    assert max(diffs) < ATOL
    assert max(float(t.abs().max()) for t in reference.logits) > 1.0  # not near-zero logits


def test_greedy_generation_equals_generate(
    reference: Reference, served: tuple[int, list[dict[str, Any]]]
) -> None:
    leader = served[1][0]
    assert leader["greedy"] == reference.greedy
    assert all(len(t) == NEW_TOKENS for t in leader["greedy"])
    assert leader["finish"] == ["length"] * len(GREEDY_PROMPTS)


def test_a_replace_switch_mid_generation_changes_no_token(
    reference: Reference, served: tuple[int, list[dict[str, Any]]]
) -> None:
    leader = served[1][0]
    assert leader["switch_answer"]["applied"] is True, leader["switch_answer"]
    assert leader["switch_answer"]["mode"] == "background"
    assert all(8 <= n < SWITCH_TOKENS for n in leader["tokens_at_switch"])
    assert leader["served_after"]
    assert leader["switch"] == reference.switch


def test_a_mixed_batch_equals_each_request_alone_and_generate(
    reference: Reference, served: tuple[int, list[dict[str, Any]]]
) -> None:
    leader = served[1][0]
    assert leader["mixed"] == leader["alone"]
    assert leader["mixed"] == reference.mixed
