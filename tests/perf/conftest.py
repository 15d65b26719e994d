"""Shared fixtures: the seed's shape and a tiny profile with round numbers for hand computation."""

from __future__ import annotations

import pytest

from moe_operator.planning.perf import ModelShape, Profile
from moe_operator.planning.perf_report import load_profile


@pytest.fixture
def seed() -> ModelShape:
    return ModelShape()


@pytest.fixture
def h100() -> Profile:
    return load_profile("h100-sxm")


@pytest.fixture
def tiny() -> ModelShape:
    """hidden 4, ffn 8, 1 head of 4, top-1 of 4 experts, 1-byte dtype, 2 layers."""
    return ModelShape(
        layers=2, experts=4, hidden=4, ffn=8, heads=1, head_dim=4, top_k=1, dtype_bytes=1
    )
