"""Hypothesis strategies shared by the planning tests: shapes, plans and loads."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from moe_contract.plan import Plan


@dataclass(frozen=True)
class Case:
    """A model shape, a valid current plan and a window of loads."""

    layers: int
    experts: int
    ranks: int
    slots_per_rank: int
    plan: Plan
    loads: tuple[tuple[float, ...], ...]
    """expert_load [L][E]."""


@st.composite
def layer_slots(draw: st.DrawFn, experts: int, ranks: int, slots_per_rank: int) -> tuple:
    """A random valid layer [R][S]: every expert at least once, the rest random replicas."""
    extra = ranks * slots_per_rank - experts
    flat = list(range(experts)) + draw(
        st.lists(st.integers(0, experts - 1), min_size=extra, max_size=extra)
    )
    flat = draw(st.permutations(flat))
    return tuple(
        tuple(flat[rank * slots_per_rank : (rank + 1) * slots_per_rank]) for rank in range(ranks)
    )


@st.composite
def cases(draw: st.DrawFn, max_ranks: int = 6, max_slots: int = 3) -> Case:
    ranks = draw(st.integers(1, max_ranks))
    slots_per_rank = draw(st.integers(1, max_slots))
    experts = draw(st.integers(1, ranks * slots_per_rank))
    layers = draw(st.integers(1, 3))
    slots = tuple(draw(layer_slots(experts, ranks, slots_per_rank)) for _ in range(layers))
    plan = Plan(version=draw(st.integers(1, 50)), slotsPerRank=slots_per_rank, slots=slots)
    load = st.one_of(
        st.integers(0, 10_000).map(float), st.floats(0, 1e6, allow_nan=False, allow_subnormal=False)
    )
    loads = tuple(
        tuple(draw(st.lists(load, min_size=experts, max_size=experts))) for _ in range(layers)
    )
    return Case(layers, experts, ranks, slots_per_rank, plan, loads)
