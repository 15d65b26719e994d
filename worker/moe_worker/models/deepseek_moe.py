"""The DeepSeek-style MoE block GLM-4.5 and DeepSeek-V3 share: dense first layers, shared experts
beside the routed ones, and the sigmoid router with its correction bias and group-limited top-K.

Facts from transformers 5.24 (`modeling_glm4_moe.py`, `modeling_deepseek_v3.py` and their
configurations):
- the first `first_k_dense_replace` blocks have a dense SwiGLU MLP of `intermediate_size`; the
  others an MoE block: `n_routed_experts` experts of `moe_intermediate_size`, plus
  `n_shared_experts` shared experts as ONE SwiGLU MLP of n x `moe_intermediate_size`, added;
- router (`...TopkRouter`): logits in fp32 (its weight and `e_score_correction_bias` stay fp32
  in any dtype), sigmoid scores; selection on scores + e_score_correction_bias, within the
  `topk_group` best of `n_group` groups (a group scores the sum of its two best; the rest is
  -inf); weights = the chosen unbiased scores, / (sum + 1e-20) when `norm_topk_prob`, times
  `routed_scaling_factor` (see `RouterSpec`, `models.routing.group_limited`);
- checkpoints: `model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight` (dense blocks),
  `...mlp.gate.weight`, `...mlp.gate.e_score_correction_bias`,
  `...mlp.shared_experts.{gate,up,down}_proj.weight`, `...mlp.experts.{j}.gate_proj.weight` (or
  fused, see `swiglu`). Multi-token-prediction layers past `num_hidden_layers` are not read.

Our `layers` counts the MoE blocks (the plan's layers); `dense_layers` the dense ones before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from moe_contract.shape import ModelShape
from moe_worker.models.config import (
    ModelSpec,
    RouterSpec,
    UnsupportedConfig,
    first_of,
    require,
)
from moe_worker.models.mlp import SharedExperts, SwiGLU
from moe_worker.models.swiglu import SwiGLUArchitecture


class DeepSeekMoEArchitecture(SwiGLUArchitecture):
    """A family with DeepSeek's MoE block (GLM-4.5, DeepSeek-V3)."""

    dense_layers_default: int
    """transformers' default `first_k_dense_replace`."""
    router_defaults: RouterSpec
    """transformers' defaults of n_group, topk_group and routed_scaling_factor."""

    def check_config(self, config: Mapping[str, Any]) -> None:
        # Hub configs written by DeepSeek's own code name what transformers always does.
        require(config, "scoring_func", "sigmoid", "sigmoid")
        require(config, "topk_method", "noaux_tc", "noaux_tc")
        require(config, "moe_layer_freq", 1, 1)

    def config_sizes(self, config: Mapping[str, Any]) -> dict[str, int]:
        dense = int(first_of(config, "first_k_dense_replace", default=self.dense_layers_default))
        shared = int(first_of(config, "n_shared_experts", default=1))
        return {
            "dense_layers": dense,
            "dense_ffn_hidden": int(first_of(config, "intermediate_size")) if dense else 0,
            "shared_ffn_hidden": shared * int(first_of(config, "moe_intermediate_size")),
        }

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"router": self.router_spec(config)}

    def router_spec(self, config: Mapping[str, Any]) -> RouterSpec:
        """The sigmoid router of config.json; refuses groups the experts cannot form."""
        d = self.router_defaults
        groups = int(first_of(config, "n_group", default=d.n_group))
        best = int(first_of(config, "topk_group", default=d.topk_group))
        experts = int(first_of(config, *self.config_reader.experts))
        if groups < 1 or experts % groups or (groups > 1 and experts // groups < 2):
            raise UnsupportedConfig(
                f"config.json n_group={groups} must divide n_routed_experts={experts} into "
                "groups of at least 2 (a group scores the sum of its two best)"
            )
        if not 1 <= best <= groups:
            raise UnsupportedConfig(
                f"config.json topk_group={best} must be between 1 and n_group={groups}"
            )
        scale = float(first_of(config, "routed_scaling_factor", default=d.routed_scaling_factor))
        return RouterSpec("sigmoid", groups, best, scale)

    def synthetic_router(self, shape: ModelShape) -> RouterSpec:
        """The family's router for synthetic weights: its default groups where the shape's
        experts form them, else one group."""
        d = self.router_defaults
        if shape.experts % d.n_group or shape.experts // d.n_group < 2:
            return RouterSpec("sigmoid", 1, 1, d.routed_scaling_factor)
        return d

    def mlp(self, spec: ModelSpec, *, moe: bool) -> nn.Module | None:
        s = spec.shape
        if not moe:
            return SwiGLU(s.hidden, s.dense_ffn_hidden)
        return SharedExperts(s.hidden, s.shared_ffn_hidden) if s.shared_ffn_hidden else None

    def router_keys(self, layer: int) -> tuple[str, ...]:
        return (f"model.layers.{layer}.mlp.gate.weight",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return tuple(f"{prefix}.{m}_proj.weight" for m in self.expert_matrices)
