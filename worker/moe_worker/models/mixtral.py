"""Mixtral (`MixtralForCausalLM`): RoPE, grouped-query attention, SwiGLU experts w1/w3/w2.

Facts from transformers 5.24 (`modeling_mixtral.py`, `configuration_mixtral.py`) and hub configs:
- router: softmax over all experts in fp32, top-K, always renormalised over the top-K;
- attention scaled by head_dim ** -0.5; head_dim defaults to hidden / heads (config may say null);
- rms_norm_eps default 1e-5, RoPE base default 1e6 (hub configs set `rope_theta`, transformers 5
  writes `rope_parameters`), lm_head untied by default;
- hub checkpoints: `model.layers.{i}.block_sparse_moe.gate.weight` and
  `...block_sparse_moe.experts.{j}.w1|w3|w2.weight` (w1 gate, w3 up, w2 down). transformers 5
  writes that format back on `save_pretrained`; with `save_original_format=False` it renames
  `block_sparse_moe` to `mlp` and fuses the experts (see `swiglu`).
- `sliding_window` shorter than `max_position_embeddings` caps the context (exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_contract.shape import ModelShape
from moe_worker.models.config import (
    ModelSpec,
    context_length,
    first_of,
    require,
    rope_theta,
    shape_from,
    token_ids,
)
from moe_worker.models.layers import Attention
from moe_worker.models.swiglu import SwiGLUArchitecture

RMS_NORM_EPS = 1e-5
ROPE_THETA = 1e6

_MATRIX_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


class Mixtral(SwiGLUArchitecture):
    name = "Mixtral"
    hf_architectures = ("MixtralForCausalLM", "mixtral")

    def parse_config(self, config: Mapping[str, Any]) -> ModelSpec:
        require(config, "hidden_act", "silu", "silu")
        hidden, heads = (
            int(first_of(config, "hidden_size")),
            int(first_of(config, "num_attention_heads")),
        )
        shape = shape_from(
            config,
            self.name,
            layers=int(first_of(config, "num_hidden_layers")),
            experts=int(first_of(config, "num_local_experts", "num_experts")),
            hidden=hidden,
            ffn_hidden=int(first_of(config, "intermediate_size")),
            heads=heads,
            head_dim=int(first_of(config, "head_dim", default=hidden // heads)),
            top_k=int(first_of(config, "num_experts_per_tok")),
            kv_heads=int(first_of(config, "num_key_value_heads", default=heads)),
            vocab_size=int(first_of(config, "vocab_size")),
        )
        return ModelSpec(
            shape=shape,
            rms_norm_eps=float(first_of(config, "rms_norm_eps", default=RMS_NORM_EPS)),
            rope_theta=rope_theta(config, ROPE_THETA),
            max_context=context_length(config, config.get("sliding_window")),
            norm_topk_prob=True,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            eos_token_ids=token_ids(config.get("eos_token_id")),
        )

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=True)

    def attention(self, spec: ModelSpec) -> Attention:
        return Attention(spec)

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (
            f"model.layers.{layer}.block_sparse_moe.gate.weight",
            f"model.layers.{layer}.mlp.gate.weight",
        )

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return tuple(f"{prefix}.{_MATRIX_NAMES[m]}.weight" for m in self.expert_matrices)
