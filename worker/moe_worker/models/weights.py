"""Where weights come from, and building a model from them.

A `WeightSource` gives the dense parameters by the model's own names and one expert at a time, so
a rank asks only for the experts its plan places on it. Two implementations: `SyntheticWeights`
(here: deterministic from (seed, name), identical on every rank) and `HFCheckpoint`
(`moe_worker.models.checkpoint`: a Hugging Face directory read tensor by tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models import Architecture, ExpertWeights, LocalExperts, ModelSpec, architecture
from moe_worker.models.base import DTYPES, generator_for
from moe_worker.models.transformer import MoETransformer, materialize


class WeightSource(Protocol):
    arch: Architecture
    spec: ModelSpec

    def dense(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The dense parameter `name` (a `MoETransformer.state_dict()` key), on the CPU."""
        ...

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """All matrices of routed expert `expert` of MoE layer `layer`, on the CPU."""
        ...


class SyntheticWeights:
    """Seeded weights: N(0, 1/fan_in) keyed by (seed, name), RMSNorm weights ones.

    Nothing is stored: any rank computes any tensor, identically.
    """

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        self.arch, self.spec, self.seed = architecture(spec.shape.architecture), spec, seed

    @classmethod
    def for_shape(
        cls, shape: ModelShape, seed: int = 0, max_context: int = 4096
    ) -> SyntheticWeights:
        return cls(architecture(shape.architecture).default_spec(shape, max_context), seed)

    def dense(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if len(shape) == 1:  # only norms are vectors here
            return torch.ones(shape)
        return _normal(shape, self.seed, name)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        shapes = self.arch.expert_shapes(self.spec.shape)
        names = self.arch.expert_matrices
        return ExpertWeights(
            tuple(
                _normal(shape, self.seed, self.arch.synthetic_expert_name(layer, expert, name))
                for name, shape in zip(names, shapes, strict=True)
            )
        )


def _normal(shape: tuple[int, ...], seed: int, name: str) -> Tensor:
    """fan-in scaled normal, exactly as the retired seed model drew it (same weights per seed)."""
    return torch.randn(shape, generator=generator_for(seed, name)) / math.sqrt(shape[-1])


def serving_dtype(source: WeightSource, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else DTYPES[source.spec.shape.dtype]


def build_model(
    source: WeightSource, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> MoETransformer:
    """The dense part with its weights, in `dtype` (default: the shape's), ready for inference."""
    with torch.device("meta"):
        model = MoETransformer(source.arch, source.spec).to(serving_dtype(source, dtype))
    model = materialize(model.keep_fp32_(), device)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied LM head is listed once
            param.copy_(source.dense(name, tuple(param.shape)))
    return model.eval()


def load_experts(
    source: WeightSource,
    wanted: Iterable[tuple[int, int]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[tuple[int, int], ExpertWeights]:
    """Only the (layer, expert) pairs asked for, e.g. those a plan places on this rank."""
    dtype = serving_dtype(source, dtype)
    return {(layer, e): source.expert(layer, e).to(device, dtype) for layer, e in wanted}


def local_experts(
    source: WeightSource, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LocalExperts:
    """Every expert in this process: the world-size-1 MoEFn."""
    s = source.spec.shape
    pairs = [(layer, e) for layer in range(s.layers) for e in range(s.experts)]
    loaded = load_experts(source, pairs, device, dtype)
    experts = [[loaded[(layer, e)] for e in range(s.experts)] for layer in range(s.layers)]
    return LocalExperts(source.arch, experts)
