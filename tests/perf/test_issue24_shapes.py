"""The performance model's sizes of the issue 24 families, by hand: DeepSeek-V3's latent KV cache
and MLA projections, dense first layers and shared experts on every rank (never expert slots)."""

from __future__ import annotations

import pytest

from moe_contract.shape import ModelShape
from moe_operator.cli.perf import main
from moe_operator.perf import Layout, Profile, Workload, predict
from moe_operator.perf.model import (
    attention_projection_flops,
    kv_cache_bytes,
    memory_per_gpu,
    projection_flops,
    score_flops,
    weight_bytes,
)
from moe_operator.perf.profiles import load_profile

DEEPSEEK_V3 = ModelShape(
    layers=58,
    experts=256,
    hidden=7168,
    ffn_hidden=2048,
    heads=128,
    head_dim=192,
    top_k=8,
    dtype="bfloat16",
    architecture="DeepseekV3",
    vocab_size=129280,
    dense_layers=3,
    dense_ffn_hidden=18432,
    shared_ffn_hidden=2048,
    kv_lora_rank=512,
    q_lora_rank=1536,
    rope_head_dim=64,
    v_head_dim=128,
)


def test_the_latent_cache_is_counted_in_its_own_bytes() -> None:
    assert DEEPSEEK_V3.kv_bytes_per_token_layer == (512 + 64) * 2
    wl = Workload(batch=4, seq_len=1000)
    assert kv_cache_bytes(DEEPSEEK_V3, wl) == 4 * 1000 * 1152 * 61  # dense layers cache too
    mla = ("kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim")
    as_gqa = DEEPSEEK_V3.replace(architecture="Glm4MoE", **dict.fromkeys(mla, 0))
    assert as_gqa.kv_bytes_per_token_layer == 2 * 128 * 192 * 2  # 85 x the latent's


def test_mla_projection_and_score_flops_by_hand() -> None:
    s = DEEPSEEK_V3
    attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
    assert s.attn_params == attn
    assert attention_projection_flops(s, 1) == 2 * attn
    assert projection_flops(s, 1) == 2 * attn + 2 * 7168 * 256 + 2 * 3 * 7168 * 2048
    expand = 2 * 512 * 128 * (128 + 128)
    assert score_flops(s, 1, 100, "decode") == 100 * 2 * 128 * (2 * 512 + 64) + expand
    prefill = 100 * 101 / 2 * 2 * 128 * (192 + 128) + 100 * expand
    assert score_flops(s, 1, 100, "prefill") == prefill


def test_weights_count_dense_layers_and_shared_experts_once_per_rank() -> None:
    s = DEEPSEEK_V3
    per_moe = s.attn_params + 7168 * 256 + 256 * s.expert_params + 3 * 7168 * 2048
    per_dense = s.attn_params + 3 * 7168 * 18432
    assert weight_bytes(s) == (58 * per_moe + 3 * per_dense) * 2
    layout = Layout(ep=64, slots_per_rank=4)
    mem = memory_per_gpu(s, Workload(batch=64, seq_len=4096), layout, h100())
    experts = 4 * 58 * s.expert_params * 2
    dense = 58 * (s.attn_params + 7168 * 256 + 3 * 7168 * 2048) + 3 * per_dense
    assert mem.weights == pytest.approx(experts + dense * 2)
    assert mem.per_slot == 58 * s.expert_params * 2  # a slot: routed experts only


def test_dense_layers_take_time_but_no_all_to_all() -> None:
    without = DEEPSEEK_V3.replace(dense_layers=0, dense_ffn_hidden=0)
    layout, wl = Layout(ep=64, slots_per_rank=4), Workload(batch=64, seq_len=2048)
    slower, faster = predict(DEEPSEEK_V3, wl, layout, h100()), predict(without, wl, layout, h100())
    assert slower.seconds > faster.seconds
    dense = dict(slower.breakdown)["dense layers (attention + MLP)"]
    assert slower.seconds - faster.seconds == pytest.approx(dense)
    assert dict(slower.breakdown)["EP all-to-all"] == dict(faster.breakdown)["EP all-to-all"]


def test_the_cli_takes_the_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    flags = "--architecture DeepseekV3 --layers 58 --experts 256 --hidden 7168 --ffn 2048 "
    flags += "--heads 128 --head-dim 192 --top-k 8 --dense-layers 3 --dense-ffn 18432 "
    flags += "--shared-ffn 2048 --kv-lora-rank 512 --q-lora-rank 1536 --rope-head-dim 64 "
    flags += "--v-head-dim 128 --layouts ep64s5 --json"
    assert main(flags.split()) == 0
    assert '"kv_lora_rank": 512' in capsys.readouterr().out
    assert main(["--kv-lora-rank", "512"]) == 2  # SeedMLP has no latent attention
    assert "kv_lora_rank 512 applies to DeepseekV3 only" in capsys.readouterr().err


def h100() -> Profile:
    return load_profile("h100-sxm")
