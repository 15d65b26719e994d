"""The built-in traffic source: each rank makes its own batches, with expert popularity skewed on
purpose so imbalance can be produced and then rebalanced.

The skew is a gate-logit offset: offset[e] = -zipf * ln(e + 1), which multiplies expert e's gate
probability by (e + 1) ** -zipf, i.e. Zipf popularity with expert 0 the hottest. Zipf 0 is uniform
(no offset at all). Unlike the plan's gate bias, the offset acts like the input distribution: it
changes the combine weights too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_worker.model import generator_for
from moe_worker.settings import TrafficSettings
from moe_worker.shape import ModelShape


def zipf_logit_offset(num_experts: int, exponent: float) -> Tensor | None:
    """[E] offset added to gate logits, or None when the exponent is 0."""
    if exponent == 0:
        return None
    return -exponent * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))


class TrafficSource:
    """Deterministic batches of hidden states per (seed, rank, step)."""

    def __init__(
        self, config: ModelShape, traffic: TrafficSettings, *, rank: int, seed: int
    ) -> None:
        self.config, self.traffic, self.rank, self.seed = config, traffic, rank, seed
        self.logit_offset_E = zipf_logit_offset(config.experts, traffic.zipf)

    @property
    def enabled(self) -> bool:
        return self.traffic.batch > 0

    def batch(self, step: int) -> Tensor:
        """[B, T, D] for this rank's `step`."""
        shape = (self.traffic.batch, self.traffic.seq_len, self.config.hidden)
        return torch.randn(shape, generator=generator_for(self.seed, f"traffic/{self.rank}/{step}"))
