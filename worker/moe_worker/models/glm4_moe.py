"""GLM-4.5 / 4.6 (`Glm4MoeForCausalLM`): DeepSeek's MoE block (`deepseek_moe`) under grouped-query
attention with partial rotary embeddings.

Facts from transformers 5.24 (`modeling_glm4_moe.py`, `configuration_glm4_moe.py`) beyond the
shared block:
- attention: q/k/v with biases when `attention_bias` (default false; GLM-4.5 sets true), o
  without; q and k RMS-normalised per head when `use_qk_norm`; RoPE (rotate-half) on the first
  `partial_rotary_factor` x head_dim dims of each head (default 0.5; transformers 5 keeps it in
  `rope_parameters`, 4.x configs at the top level), scaled by head_dim ** -0.5;
- defaults: rms_norm_eps 1e-5, first_k_dense_replace 1, n_group 1, topk_group 1,
  routed_scaling_factor 1.0, norm_topk_prob true.
Refused: scaled RoPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_contract.shape import ModelShape
from moe_worker.models.config import (
    ConfigReader,
    ModelSpec,
    RouterSpec,
    first_of,
    rope_parameters,
)
from moe_worker.models.deepseek_moe import DeepSeekMoEArchitecture

RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
PARTIAL_ROTARY_FACTOR = 0.5


class Glm4MoE(DeepSeekMoEArchitecture):
    name = "Glm4MoE"
    hf_architectures = ("Glm4MoeForCausalLM", "glm4_moe")
    config_reader = ConfigReader(
        experts=("n_routed_experts", "num_local_experts"),
        ffn_hidden=("moe_intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        norm_topk_prob=True,
    )
    dense_layers_default = 1
    router_defaults = RouterSpec("sigmoid", 1, 1, 1.0)

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        factor = rope_parameters(config)[0].get("partial_rotary_factor", PARTIAL_ROTARY_FACTOR)
        return {
            **super().config_details(config),
            "attention_bias": bool(first_of(config, "attention_bias", default=False)),
            "qk_norm": bool(first_of(config, "use_qk_norm", default=False)),
            "partial_rotary_factor": float(factor),
        }

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(
            shape,
            RMS_NORM_EPS,
            ROPE_THETA,
            max_context,
            router=self.synthetic_router(shape),
            partial_rotary_factor=PARTIAL_ROTARY_FACTOR,
        )
