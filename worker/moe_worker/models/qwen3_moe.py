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

from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models.config import (
    ModelSpec,
    UnsupportedConfig,
    context_length,
    first_of,
    require,
    rope_theta,
    shape_from,
    token_ids,
)
from moe_worker.models.layers import Attention, RMSNorm
from moe_worker.models.swiglu import SwiGLUArchitecture

RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class QKNormAttention(Attention):
    """Attention whose queries and keys are RMS-normalised per head before RoPE."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)

    def project(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q_NHHd, k_NHHd, v_NHHd = super().project(x_ND)
        return self.q_norm(q_NHHd), self.k_norm(k_NHHd), v_NHHd


class Qwen3MoE(SwiGLUArchitecture):
    name = "Qwen3MoE"
    hf_architectures = ("Qwen3MoeForCausalLM", "qwen3_moe")

    def parse_config(self, config: Mapping[str, Any]) -> ModelSpec:
        require(config, "hidden_act", "silu", "silu")
        require(config, "attention_bias", False, False)
        require(config, "decoder_sparse_step", 1, 1)
        if config.get("mlp_only_layers"):
            raise UnsupportedConfig(
                f"config.json mlp_only_layers={config['mlp_only_layers']!r} is not supported "
                "(every layer must be an MoE layer)"
            )
        hidden = int(first_of(config, "hidden_size"))
        heads = int(first_of(config, "num_attention_heads"))
        shape = shape_from(
            config,
            self.name,
            layers=int(first_of(config, "num_hidden_layers")),
            experts=int(first_of(config, "num_experts", "num_local_experts")),
            hidden=hidden,
            ffn_hidden=int(first_of(config, "moe_intermediate_size")),
            heads=heads,
            head_dim=int(first_of(config, "head_dim", default=hidden // heads)),
            top_k=int(first_of(config, "num_experts_per_tok")),
            kv_heads=int(first_of(config, "num_key_value_heads", default=heads)),
            vocab_size=int(first_of(config, "vocab_size")),
        )
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        return ModelSpec(
            shape=shape,
            rms_norm_eps=float(first_of(config, "rms_norm_eps", default=RMS_NORM_EPS)),
            rope_theta=rope_theta(config, ROPE_THETA),
            max_context=context_length(config, window),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            eos_token_ids=token_ids(config.get("eos_token_id")),
        )

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=True)

    def attention(self, spec: ModelSpec) -> Attention:
        return QKNormAttention(spec)

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (f"model.layers.{layer}.mlp.gate.weight",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return tuple(f"{prefix}.{m}_proj.weight" for m in self.expert_matrices)
