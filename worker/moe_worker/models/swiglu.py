"""SwiGLU experts, shared by Mixtral and Qwen3-MoE: y = down(silu(gate x) * up x).

Checkpoints store them per expert (the hub format: three [F, D] / [D, F] matrices per expert), or
fused as transformers 5 keeps them in memory and writes with `save_original_format=False`:
`experts.gate_up_proj` [E, 2F, D] (gate rows first, then up) and `experts.down_proj` [E, D, F].

Legend: N tokens, D hidden, F expert ffn hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models.base import Architecture, ExpertWeights
from moe_worker.models.grouped import SlotGroups


class SwiGLUArchitecture(Architecture):
    expert_matrices = ("gate", "up", "down")

    def expert_shapes(self, shape: ModelShape) -> tuple[tuple[int, int], ...]:
        d, f = shape.hidden, shape.ffn_hidden
        return ((f, d), (f, d), (d, f))

    def expert_forward(self, x_ND: Tensor, weights: ExpertWeights) -> Tensor:
        gate_FD, up_FD, down_DF = weights.matrices
        return (F.silu(x_ND @ gate_FD.T) * (x_ND @ up_FD.T)) @ down_DF.T

    def grouped_forward(self, x_ND: Tensor, stacks: Sequence[Tensor], groups: SlotGroups) -> Tensor:
        gate_SFD, up_SFD, down_SDF = stacks
        # In place: the same kernels as F.silu(a) * b, without two more [N, F] buffers.
        gated_NF = F.silu(groups.linear(x_ND, gate_SFD), inplace=True)
        gated_NF.mul_(groups.linear(x_ND, up_SFD))
        return groups.linear(gated_NF, down_SDF)

    def fused_layer_prefix(self, layer: int) -> str:
        """Where transformers 5 keeps the layer's MoE block (`...mlp`)."""
        return f"model.layers.{layer}.mlp"

    def fused_expert_keys(self, layer: int) -> tuple[str, ...]:
        prefix = self.fused_layer_prefix(layer)
        return (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj")

    def expert_from_fused(self, slices: Sequence[Tensor]) -> ExpertWeights:
        gate_up_2FD, down_DF = slices
        gate_FD, up_FD = gate_up_2FD.chunk(2, dim=0)
        return ExpertWeights((gate_FD.contiguous(), up_FD.contiguous(), down_DF))
