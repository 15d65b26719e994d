"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA with per-head q/k RMSNorm before RoPE, explicit
head_dim, SwiGLU experts gate_proj/up_proj/down_proj (typically 128 experts, top-8).

Facts from transformers 5.24 (`modeling_qwen3_moe.py`, `configuration_qwen3_moe.py`) and hub
configs:
- router: softmax in fp32 over all experts, top-K, renormalised only if `norm_topk_prob`
  (class default false; Qwen3-30B-A3B sets true);
- q_norm / k_norm: RMSNorm over head_dim (shared by all heads), applied after the projections
  and before RoPE; attention scaled by head_dim ** -0.5, head_dim read from config.json;
- rms_norm_eps default 1e-6, `num_experts` (hub) or `num_local_experts` (transformers 5 writes
  it through its attribute map), `moe_intermediate_size` is the expert width;
- hub checkpoints: `model.layers.{i}.mlp.gate.weight`, `...mlp.experts.{j}.gate_proj.weight`
  (also up_proj, down_proj), `...self_attn.q_norm.weight`; fused format as in `swiglu`.
Refused (not served exactly by an all-MoE model): `mlp_only_layers` not empty,
`decoder_sparse_step` != 1, `attention_bias` true, any scaled RoPE. `use_sliding_window` caps the
context at `sliding_window` (exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_contract.shape import ModelShape
from moe_worker.models.config import ConfigReader, ModelSpec, UnsupportedConfig, require
from moe_worker.models.swiglu import SwiGLUArchitecture

RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class Qwen3MoE(SwiGLUArchitecture):
    name = "Qwen3MoE"
    hf_architectures = ("Qwen3MoeForCausalLM", "qwen3_moe")
    config_reader = ConfigReader(
        experts=("num_experts", "num_local_experts"),
        ffn_hidden=("moe_intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        sliding_window="when_used",
        required=(
            ("hidden_act", "silu", "silu"),
            ("attention_bias", False, False),
            ("decoder_sparse_step", 1, 1),
        ),
    )

    def check_config(self, config: Mapping[str, Any]) -> None:
        refuse_mlp_only_layers(config)

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"qk_norm": True}

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(
            shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=True, qk_norm=True
        )

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (f"model.layers.{layer}.mlp.gate.weight",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return tuple(f"{prefix}.{m}_proj.weight" for m in self.expert_matrices)


def refuse_mlp_only_layers(config: Mapping[str, Any]) -> None:
    """Qwen's dense layers at arbitrary places are not served (every layer must be MoE)."""
    require(config, "decoder_sparse_step", 1, 1)
    if config.get("mlp_only_layers"):
        raise UnsupportedConfig(
            f"config.json mlp_only_layers={config['mlp_only_layers']!r} is not supported "
            "(every layer must be an MoE layer)"
        )
