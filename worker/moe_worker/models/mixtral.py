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

from moe_contract.shape import ModelShape
from moe_worker.models.config import ConfigReader, ModelSpec
from moe_worker.models.swiglu import SwiGLUArchitecture

RMS_NORM_EPS = 1e-5
ROPE_THETA = 1e6

_MATRIX_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


class Mixtral(SwiGLUArchitecture):
    name = "Mixtral"
    hf_architectures = ("MixtralForCausalLM", "mixtral")
    config_reader = ConfigReader(
        experts=("num_local_experts", "num_experts"),
        ffn_hidden=("intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        norm_topk_prob=True,
        norm_topk_fixed=True,
        sliding_window="always",
    )

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=True)

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (
            f"model.layers.{layer}.block_sparse_moe.gate.weight",
            f"model.layers.{layer}.mlp.gate.weight",
        )

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return tuple(f"{prefix}.{_MATRIX_NAMES[m]}.weight" for m in self.expert_matrices)
