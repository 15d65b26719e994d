"""The dense feed-forward parts every rank holds: the router, the MLP of a dense layer, and the
shared experts of an MoE layer (which every token visits beside its routed experts; never placed
by a plan, never counted as load).

Module and parameter names follow the Hugging Face layout below `model.layers.{i}`: a dense
layer's `mlp.gate_proj|up_proj|down_proj`, DeepSeek-V3 / GLM-4.5's `mlp.shared_experts.*`,
Qwen2-MoE's `mlp.shared_expert.*` with its `mlp.shared_expert_gate`; the router is the layer's
`gate` (`weight`, and the sigmoid routers' `e_score_correction_bias`).

Legend: N tokens, D hidden, F MLP inner dimension, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): a dense MLP (transformers' `...MLP` of these families)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class SharedExperts(nn.Module):
    """DeepSeek-V3 / GLM-4.5: n_shared_experts as one MLP of n x moe_intermediate_size, added."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.shared_experts = SwiGLU(hidden, inner)

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.shared_experts(x_ND)


class GatedSharedExpert(nn.Module):
    """Qwen2-MoE: one shared expert scaled per token by sigmoid(shared_expert_gate x)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.shared_expert = SwiGLU(hidden, inner)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x_ND: Tensor) -> Tensor:
        return torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)


class Router(nn.Linear):
    """The gate: x [N, D] -> logits [N, E] (a Linear without bias, as transformers' routers).

    A softmax router multiplies in the model's dtype; a sigmoid router keeps its weight and its
    `e_score_correction_bias` in fp32 whatever the model's dtype (transformers'
    `_keep_in_fp32_modules_strict`; `MoETransformer.keep_fp32_`) and multiplies in fp32.
    """

    def __init__(self, hidden: int, experts: int, *, sigmoid: bool = False) -> None:
        super().__init__(hidden, experts, bias=False)
        self.keep_fp32 = sigmoid
        correction = nn.Parameter(torch.zeros(experts), requires_grad=False) if sigmoid else None
        self.register_parameter("e_score_correction_bias", correction)

    def forward(self, x_ND: Tensor) -> Tensor:
        if self.keep_fp32:
            return F.linear(x_ND.float(), self.weight.float())
        return F.linear(x_ND, self.weight)

    @property
    def correction_E(self) -> Tensor | None:
        """The checkpoint's selection bias [E] (sigmoid routers), else None."""
        bias: Tensor | None = self.e_score_correction_bias
        return bias
