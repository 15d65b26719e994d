"""What the transformers parity tests share: the tiny model's sizes and random token prompts."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 256
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.15,  # larger than the default, so logits and routing are decisive
}


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts of these lengths, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def correction_biases(model: Any, seed: int = 0) -> Any:
    """Non-zero e_score_correction_bias in every sigmoid router (transformers initialises them to
    zero), of the size of the scores' spread, so that they change which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.2)
    return model


def qwen2_moe() -> Any:
    """Qwen2-MoE: 8 routed experts top-2 (not renormalised), a gated shared expert, q/k/v biases."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **TINY,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config)


def glm4_moe() -> Any:
    """GLM-4.5: a dense first layer, 8 routed experts in 2 groups (the best 1), top-2, a shared
    expert, q/k/v biases, q/k norm, partial rotary, scaled weights, a correction bias."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        **{**TINY, "num_hidden_layers": 3},
        head_dim=24,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        attention_bias=True,
        use_qk_norm=True,
    )
    return correction_biases(Glm4MoeForCausalLM(config))


def deepseek_v3(**changes: Any) -> Any:
    """DeepSeek-V3: a dense first layer, 8 routed experts in 4 groups (the best 2), top-3, two
    shared experts, MLA (latent 16, low-rank queries 24, rope 8 interleaved, nope 16, value 12),
    a correction bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    settings: dict[str, Any] = {
        **TINY,
        "num_hidden_layers": 3,
        "num_key_value_heads": TINY["num_attention_heads"],
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 12,
        **changes,
    }
    return correction_biases(DeepseekV3ForCausalLM(DeepseekV3Config(**settings)))
