"""What several parts share: seeded random weights drawn on the device itself, in the serving
dtype (a rank's synthetic weights are drawn on the CPU in fp32, tensor by tensor: minutes at the
seed's sizes), plans at world 1, and a prefill through an engine.

Legend: L layers, E experts, S slots per rank.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from moe_contract.plan import Plan
from moe_contract.shape import ModelShape
from moe_worker.models import ExpertWeights, architecture
from moe_worker.models.base import DTYPES


class DeviceWeights:
    """A `WeightSource` whose tensors are N(0, 1/fan_in) drawn on `device` in the shape's dtype,
    keyed by (seed, name); norms are ones."""

    def __init__(
        self, shape: ModelShape, device: torch.device, seed: int = 0, max_context: int = 4096
    ) -> None:
        self.arch = architecture(shape.architecture)
        self.spec = self.arch.default_spec(shape, max_context)
        self.device, self.seed, self.dtype = device, seed, DTYPES[shape.dtype]

    def dense(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        return self._normal(shape, name)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        shapes = self.arch.expert_shapes(self.spec.shape)
        names = self.arch.expert_matrices
        return ExpertWeights(
            tuple(
                self._normal(shape, self.arch.synthetic_expert_name(layer, expert, name))
                for name, shape in zip(names, shapes, strict=True)
            )
        )

    def _normal(self, shape: tuple[int, ...], name: str) -> Tensor:
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        generator = torch.Generator(self.device).manual_seed(
            int.from_bytes(digest[:8], "little") & (2**63 - 1)
        )
        x = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        return x.div_(math.sqrt(shape[-1]))


def world1_plan(layers: int, slots: tuple[int, ...], version: int, method: str = "Bench") -> Plan:
    """One rank holding `slots` (logical experts in slot order) in every layer."""
    return Plan(
        version=version,
        slotsPerRank=len(slots),
        slots=tuple((tuple(slots),) for _ in range(layers)),
        method=method,
    )


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`count` random prompts of `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(count)]
