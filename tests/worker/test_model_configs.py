"""config.json parsing: hub configs (written by transformers 4.x) map to the right ModelShape, and
what cannot be served exactly is refused naming the field, or handled exactly (context cap)."""

from __future__ import annotations

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
