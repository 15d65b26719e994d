"""config.json parsing: hub configs (written by transformers 4.x) map to the right ModelShape, and
what cannot be served exactly is refused naming the field, or handled exactly (context cap)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from moe_contract.shape import ModelShape
from moe_worker.models import UnsupportedConfig, architecture, parse_hf_config

# As published on the hub (fields that matter here), transformers 4.x style.
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 2,
}
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_act": "silu",
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1e6,
    "use_sliding_window": False,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}


def test_mixtral_8x7b_maps_to_its_shape() -> None:
    arch, spec = parse_hf_config(MIXTRAL_8X7B)
    assert arch is architecture("Mixtral")
    assert spec.shape == ModelShape(
        layers=32,
        experts=8,
        hidden=4096,
        ffn_hidden=14336,
        heads=32,
        head_dim=128,
        top_k=2,
        dtype="bfloat16",
        architecture="Mixtral",
        kv_heads=8,
        vocab_size=32000,
    )
    assert (spec.rope_theta, spec.rms_norm_eps, spec.max_context) == (1e6, 1e-5, 32768)
    assert spec.norm_topk_prob and not spec.tie_word_embeddings
    assert spec.eos_token_ids == (2,)
    assert spec.shape.expert_params == 3 * 4096 * 14336


def test_qwen3_30b_a3b_maps_to_its_shape() -> None:
    arch, spec = parse_hf_config(QWEN3_30B_A3B)
    assert arch is architecture("Qwen3MoE")
    assert spec.shape == ModelShape(
        layers=48,
        experts=128,
        hidden=2048,
        ffn_hidden=768,
        heads=32,
        head_dim=128,
        top_k=8,
        dtype="bfloat16",
        architecture="Qwen3MoE",
        kv_heads=4,
        vocab_size=151936,
    )
    assert (spec.rope_theta, spec.rms_norm_eps, spec.max_context) == (1e6, 1e-6, 40960)
    assert spec.norm_topk_prob and spec.eos_token_ids == (151645,)


def test_transformers_5_spellings_are_read_too() -> None:
    config = {**QWEN3_30B_A3B, "num_local_experts": 64, "dtype": "float32"}
    del config["num_experts"], config["torch_dtype"], config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    _, spec = parse_hf_config(config)
    assert (spec.shape.experts, spec.shape.dtype, spec.rope_theta) == (64, "float32", 5e5)


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        (MIXTRAL_8X7B, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        (
            MIXTRAL_8X7B,
            {"rope_parameters": {"rope_type": "linear", "factor": 2}},
            "rope_parameters",
        ),
        (MIXTRAL_8X7B, {"hidden_act": "gelu"}, "hidden_act"),
        (QWEN3_30B_A3B, {"mlp_only_layers": [0, 5]}, "mlp_only_layers"),
        (QWEN3_30B_A3B, {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        (QWEN3_30B_A3B, {"attention_bias": True}, "attention_bias"),
        (QWEN3_30B_A3B, {"torch_dtype": "float8_e4m3fn"}, "dtype"),
        (QWEN3_30B_A3B, {"num_experts_per_tok": 200}, "top_k"),
        (QWEN3_30B_A3B, {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"architectures": ["OlmoeForCausalLM"]}, {}, "architectures"),
    ],
)
def test_what_cannot_be_served_exactly_is_refused_by_name(
    base: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    with pytest.raises(UnsupportedConfig, match=field):
        parse_hf_config({**base, **change})


def test_a_sliding_window_caps_the_context() -> None:
    _, spec = parse_hf_config({**MIXTRAL_8X7B, "sliding_window": 4096})
    assert spec.max_context == 4096
    qwen = {**QWEN3_30B_A3B, "sliding_window": 2048}
    assert parse_hf_config(qwen)[1].max_context == 40960  # ignored unless use_sliding_window
    assert parse_hf_config({**qwen, "use_sliding_window": True})[1].max_context == 2048


# The three families of issue 24, as published (the fields that matter here).
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
    "eos_token_id": 1,
}
KIMI_K2 = {
    **DEEPSEEK_V3,
    "model_type": "kimi_k2",
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 384,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "routed_scaling_factor": 2.827,
    "vocab_size": 163840,
    "max_position_embeddings": 131072,
    "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "factor": 32.0},
}
GLM_45: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "attention_bias": True,
    "first_k_dense_replace": 3,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 1536,
    "n_group": 1,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 96,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 92,
    "num_key_value_heads": 8,
    "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "torch_dtype": "bfloat16",
    "use_qk_norm": True,
    "vocab_size": 151552,
    "eos_token_id": [151329, 151336, 151338],
}
QWEN15_MOE: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "decoder_sparse_step": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
    "eos_token_id": 151643,
}


def test_deepseek_v3_maps_to_its_shape_with_mla_and_yarn() -> None:
    arch, spec = parse_hf_config(DEEPSEEK_V3)
    assert arch is architecture("DeepseekV3")
    assert spec.shape == ModelShape(
        layers=58,  # the MoE blocks: 61 minus the 3 dense ones
        experts=256,
        hidden=7168,
        ffn_hidden=2048,
        heads=128,
        head_dim=192,  # the query/key head: nope 128 + rope 64
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
    assert spec.shape.kv_bytes_per_token_layer == (512 + 64) * 2
    assert (spec.router.scoring, spec.router.n_group, spec.router.topk_group) == ("sigmoid", 8, 4)
    assert spec.router.routed_scaling_factor == 2.5 and spec.norm_topk_prob
    assert spec.rope_interleave and spec.rotary_dim == 64 and spec.max_context == 163840
    assert spec.yarn is not None and spec.yarn.factor == 40 and spec.yarn.cos_sin_factor() == 1.0
    assert abs(spec.yarn.softmax_factor() - (0.1 * math.log(40) + 1) ** 2) < 1e-12


def test_kimi_k2_is_served_as_deepseek_v3() -> None:
    arch, spec = parse_hf_config(KIMI_K2)
    assert arch is architecture("DeepseekV3")
    assert (spec.shape.dense_layers, spec.shape.layers, spec.shape.experts) == (1, 60, 384)
    assert (spec.router.n_group, spec.router.routed_scaling_factor) == (1, 2.827)


def test_glm_45_maps_to_its_shape() -> None:
    arch, spec = parse_hf_config(GLM_45)
    assert arch is architecture("Glm4MoE")
    assert spec.shape == ModelShape(
        layers=89,
        experts=160,
        hidden=5120,
        ffn_hidden=1536,
        heads=96,
        head_dim=128,
        top_k=8,
        dtype="bfloat16",
        architecture="Glm4MoE",
        kv_heads=8,
        vocab_size=151552,
        dense_layers=3,
        dense_ffn_hidden=12288,
        shared_ffn_hidden=1536,
    )
    assert spec.attention_bias and spec.qk_norm and spec.rotary_dim == 64
    assert (spec.rope_theta, spec.rms_norm_eps, spec.router.routed_scaling_factor) == (
        1e6,
        1e-5,
        2.5,
    )
    assert spec.eos_token_ids == (151329, 151336, 151338)


def test_qwen15_moe_maps_to_its_shape() -> None:
    arch, spec = parse_hf_config(QWEN15_MOE)
    assert arch is architecture("Qwen2MoE")
    assert spec.shape.shared_ffn_hidden == 5632 and spec.shape.experts == 60
    assert spec.attention_bias and not spec.norm_topk_prob  # qkv_bias defaults to true
    assert spec.router.scoring == "softmax" and spec.max_context == 8192


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        (DEEPSEEK_V3, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        (DEEPSEEK_V3, {"scoring_func": "softmax"}, "scoring_func"),
        (DEEPSEEK_V3, {"topk_method": "greedy"}, "topk_method"),
        (DEEPSEEK_V3, {"n_group": 3}, "n_group"),
        (DEEPSEEK_V3, {"topk_group": 9}, "topk_group"),
        (DEEPSEEK_V3, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        (DEEPSEEK_V3, {"first_k_dense_replace": 61}, "first_k_dense_replace"),
        (GLM_45, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
        (QWEN15_MOE, {"mlp_only_layers": [3]}, "mlp_only_layers"),
        (QWEN15_MOE, {"shared_expert_intermediate_size": None}, "shared_expert"),
    ],
)
def test_what_the_new_families_cannot_serve_exactly_is_refused_by_name(
    base: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    with pytest.raises(UnsupportedConfig, match=field):
        parse_hf_config({**base, **change})
