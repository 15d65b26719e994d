"""Shared fixtures: the seed's shape and a tiny profile with round numbers for hand computation."""

from __future__ import annotations

import pytest

from moe_operator.perf import ModelShape, Profile
from moe_operator.perf.profiles import load_profile


@pytest.fixture
def seed() -> ModelShape:
    return ModelShape.seed()


@pytest.fixture
def h100() -> Profile:
    return load_profile("h100-sxm")


@pytest.fixture
def tiny() -> ModelShape:
    """hidden 2 at 2 bytes (4 B per token), ffn 8, 1 head of 4, top-1 of 4 experts, 2 layers."""
    return ModelShape(
        layers=2, experts=4, hidden=2, ffn_hidden=8, heads=1, head_dim=4, top_k=1, dtype="float16"
    )
