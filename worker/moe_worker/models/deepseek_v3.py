"""DeepSeek-V3 / R1 and Kimi-K2 (`DeepseekV3ForCausalLM`): DeepSeek's MoE block (`deepseek_moe`)
under multi-head latent attention (`mla`).

Facts from transformers 5.24 (`modeling_deepseek_v3.py`, `configuration_deepseek_v3.py`) beyond
the shared block:
- attention: MLA with `kv_lora_rank`, `q_lora_rank` (null: queries projected directly),
  `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`; our `head_dim` is the whole query/key
  head (nope + rope; transformers writes `head_dim` = qk_rope_head_dim for its rotary module);
  `num_key_value_heads` plays no part (SDPA attends every head to its own expanded keys);
  biases on q_a, kv_a and o when `attention_bias`; the latent norms use eps 1e-6;
- RoPE over qk_rope_head_dim dims, interleaved pairs when `rope_interleave` (default true);
  YaRN scaling (the published checkpoints: factor 40 / 32, mscale_all_dim 1) scales cos/sin by
  its attention factor and the softmax by mscale(factor, mscale_all_dim) squared;
- defaults: rms_norm_eps 1e-6, first_k_dense_replace 3, n_group 8, topk_group 4,
  routed_scaling_factor 2.5, norm_topk_prob true, n_shared_experts 1.
Refused: quantized checkpoints (the hub's FP8 release; a bf16 conversion serves), other scaled
RoPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from moe_contract.shape import ModelShape
from moe_worker.models.config import ConfigReader, ModelSpec, RouterSpec, first_of
from moe_worker.models.deepseek_moe import DeepSeekMoEArchitecture
from moe_worker.models.mla import LatentAttention

RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class DeepseekV3(DeepSeekMoEArchitecture):
    name = "DeepseekV3"
    hf_architectures = ("DeepseekV3ForCausalLM", "deepseek_v3", "kimi_k2")
    config_reader = ConfigReader(
        experts=("n_routed_experts", "num_local_experts"),
        ffn_hidden=("moe_intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        norm_topk_prob=True,
        yarn=True,
    )
    dense_layers_default = 3
    router_defaults = RouterSpec("sigmoid", 8, 4, 2.5)

    def config_sizes(self, config: Mapping[str, Any]) -> dict[str, int]:
        rope = int(first_of(config, "qk_rope_head_dim"))
        return {
            **super().config_sizes(config),
            "head_dim": int(first_of(config, "qk_nope_head_dim")) + rope,
            "kv_heads": int(first_of(config, "num_attention_heads")),
            "kv_lora_rank": int(first_of(config, "kv_lora_rank")),
            "q_lora_rank": int(first_of(config, "q_lora_rank", default=0)),
            "rope_head_dim": rope,
            "v_head_dim": int(first_of(config, "v_head_dim")),
        }

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **super().config_details(config),
            "attention_bias": bool(first_of(config, "attention_bias", default=False)),
            "rope_interleave": bool(first_of(config, "rope_interleave", default=True)),
        }

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(
            shape,
            RMS_NORM_EPS,
            ROPE_THETA,
            max_context,
            router=self.synthetic_router(shape),
            rope_interleave=True,
        )

    def attention(self, spec: ModelSpec) -> nn.Module:
        return LatentAttention(spec)
