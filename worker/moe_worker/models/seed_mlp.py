"""SeedMLP: the seed's own architecture as a language model.

Experts are the seed's two-matrix GELU MLPs, y = gelu(x W_in^T) W_out^T (exact erf GELU, as the
seed's hidden-state model had), with the seed's router (softmax, top-K, renormalised). Around
them: token embeddings, pre-norm blocks, a final RMSNorm and an untied LM head.

Choice: the seed's attention had no position encoding; a language model with a KV cache needs
token order, so SeedMLP gains RoPE (rotate-half layout, base 10000), the same code path as the
Hugging Face families. Grouped-query attention follows `ModelShape.kv_heads` (None: plain MHA).
RMSNorm epsilon 1e-6 as in the seed.

Checkpoints use the Hugging Face layout so one reader serves every family: a config.json with
`architectures: ["SeedMLPForCausalLM"]` (`to_config` writes it) and tensors
`model.layers.{i}.mlp.gate.weight`, `model.layers.{i}.mlp.experts.{j}.w_in.weight` / `w_out`.
Synthetic experts are seeded by the seed model's names (`layers.{i}.experts.{j}.w_in`), so a
SeedMLP expert equals the seed model's expert of the same seed (that model is retired; the names
stay so synthetic weights do not change).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models.base import Architecture, ExpertWeights
from moe_worker.models.config import ConfigReader, ModelSpec
from moe_worker.models.grouped import SlotGroups

RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class SeedMLP(Architecture):
    name = "SeedMLP"
    hf_architectures = ("SeedMLPForCausalLM", "seed_mlp")
    expert_matrices = ("w_in", "w_out")
    config_reader = ConfigReader(
        experts=("num_local_experts",),
        ffn_hidden=("intermediate_size",),
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        norm_topk_prob=True,
        norm_topk_fixed=True,
        required=(),
    )

    def to_config(self, spec: ModelSpec) -> dict[str, Any]:
        """The config.json of a SeedMLP checkpoint (read back by `parse_config`)."""
        s = spec.shape
        return {
            "architectures": [self.hf_architectures[0]],
            "model_type": self.hf_architectures[1],
            "num_hidden_layers": s.layers,
            "num_local_experts": s.experts,
            "num_experts_per_tok": s.top_k,
            "hidden_size": s.hidden,
            "intermediate_size": s.ffn_hidden,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.key_value_heads,
            "head_dim": s.head_dim,
            "vocab_size": s.vocab_size,
            "dtype": s.dtype,
            "rms_norm_eps": spec.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
            "max_position_embeddings": spec.max_context,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "eos_token_id": list(spec.eos_token_ids) or None,
        }

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        return ModelSpec(shape, RMS_NORM_EPS, ROPE_THETA, max_context, norm_topk_prob=True)

    def expert_shapes(self, shape: ModelShape) -> tuple[tuple[int, int], ...]:
        return ((shape.ffn_hidden, shape.hidden), (shape.hidden, shape.ffn_hidden))

    def expert_forward(self, x_ND: Tensor, weights: ExpertWeights) -> Tensor:
        w_in_FD, w_out_DF = weights.matrices
        return F.gelu(x_ND @ w_in_FD.T) @ w_out_DF.T

    def grouped_forward(self, x_ND: Tensor, stacks: Sequence[Tensor], groups: SlotGroups) -> Tensor:
        w_in_SFD, w_out_SDF = stacks
        # In place: the same kernel as F.gelu, without a second [N, F] buffer (5% of a layer).
        hidden_NF = torch.ops.aten.gelu_(groups.linear(x_ND, w_in_SFD))
        return groups.linear(hidden_NF, w_out_SDF)

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (f"model.layers.{layer}.mlp.gate.weight",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return tuple(f"{prefix}.{m}.weight" for m in self.expert_matrices)
