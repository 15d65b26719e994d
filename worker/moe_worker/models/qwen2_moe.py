"""Qwen2-MoE (`Qwen2MoeForCausalLM`; Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's routed experts plus
one shared expert per layer, scaled per token by a sigmoid gate; biases on q/k/v.

Facts from transformers 5.24 (`modeling_qwen2_moe.py`, `configuration_qwen2_moe.py`):
- router: softmax in fp32 over all experts, top-K, renormalised only if `norm_topk_prob`
  (default false);
- shared expert: a SwiGLU MLP of `shared_expert_intermediate_size`, times
  sigmoid(`shared_expert_gate` x) (a [1, D] Linear), added to the routed experts' output;
- attention: q/k/v with biases when `qkv_bias` (default true), o without; no q/k norm;
  head_dim = hidden / heads (or `head_dim`); RoPE rotate-half, default base 10000;
- rms_norm_eps default 1e-6; `num_experts` experts of `moe_intermediate_size`;
- checkpoints: `model.layers.{i}.mlp.gate.weight`, `...mlp.experts.{j}.gate_proj.weight` (also
  up_proj, down_proj; or fused, see `swiglu`), `...mlp.shared_expert.gate_proj.weight`,
  `...mlp.shared_expert_gate.weight`.
Refused: `mlp_only_layers` not empty, `decoder_sparse_step` != 1, scaled RoPE.
`use_sliding_window` caps the context at `sliding_window` (exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from moe_contract.shape import ModelShape
from moe_worker.models.config import ConfigReader, ModelSpec, first_of
from moe_worker.models.mlp import GatedSharedExpert
from moe_worker.models.qwen3_moe import refuse_mlp_only_layers
from moe_worker.models.swiglu import SwiGLUArchitecture

RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class Qwen2MoE(SwiGLUArchitecture):
    name = "Qwen2MoE"
    hf_architectures = ("Qwen2MoeForCausalLM", "qwen2_moe")
    config_reader = ConfigReader(
        experts=("num_experts", "num_local_experts"),
        ffn_hidden=("moe_intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        sliding_window="when_used",
    )

    def check_config(self, config: Mapping[str, Any]) -> None:
        refuse_mlp_only_layers(config)

    def config_sizes(self, config: Mapping[str, Any]) -> dict[str, int]:
        return {"shared_ffn_hidden": int(first_of(config, "shared_expert_intermediate_size"))}

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"attention_bias": bool(first_of(config, "qkv_bias", default=True))}

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(
            shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=False, attention_bias=True
        )

    def mlp(self, spec: ModelSpec, *, moe: bool) -> nn.Module | None:
        s = spec.shape
        return GatedSharedExpert(s.hidden, s.shared_ffn_hidden) if s.shared_ffn_hidden else None

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (f"model.layers.{layer}.mlp.gate.weight",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return tuple(f"{prefix}.{m}_proj.weight" for m in self.expert_matrices)
