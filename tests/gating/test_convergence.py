"""The damped gate-bias update against the worker's own router on a stationary load.

The loads are a function of the bias: fixed random gate logits (with a Zipf popularity offset)
are routed by `moe_worker.models.route_priced` under the plan's bias and guard; the operator's
`plan_rebalance` turns the counted loads and the measured rerouted fraction into the next plan.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import Plan, round_robin_plan
from moe_operator.planning.gating import GatingOptions
from moe_operator.planning.placement import imbalance
from moe_operator.planning.planners import GATING_BIAS, plan_rebalance
from moe_worker.models import route_priced

EXPERTS, TOP_K, TOKENS = 8, 2, 4000


def fixed_logits(zipf: float, seed: int) -> torch.Tensor:
    """[N, E] gate logits: unit-variance noise plus -zipf * ln(e + 1), the same every window."""
    generator = torch.Generator().manual_seed(seed)
    offset_E = -zipf * torch.log(torch.arange(1, EXPERTS + 1, dtype=torch.float32))
    return torch.randn(TOKENS, EXPERTS, generator=generator) + offset_E


def evaluate(plan: Plan, logits: torch.Tensor) -> tuple[list[float], float]:
    """Route under the plan: loads [E] and the rerouted fraction of top-K assignments."""
    bias = None if plan.gate_bias is None else torch.tensor(plan.gate_bias[0])
    routing, price = route_priced(logits, TOP_K, gate_bias_E=bias, max_margin=plan.gate_max_margin)
    loads = torch.bincount(routing.topk_ids_NK.flatten(), minlength=EXPERTS)
    return [float(x) for x in loads.tolist()], price.totals()[0] / (TOKENS * TOP_K)


def next_bias(plan: Plan, loads: list[float], fraction: float, options: GatingOptions) -> Plan:
    """The operator's GatingBias step on one layer's measured loads and rerouted fraction."""
    return plan_rebalance(
        [loads],
        world_size=EXPERTS,
        slots_per_rank=1,
        previous=plan,
        method=GATING_BIAS,
        gating_options=options,
        rerouted_fraction=[fraction],
    ).plan


def run(logits: torch.Tensor, options: GatingOptions, evaluations: int) -> list[tuple]:
    """[(imbalance, rerouted fraction, bias)] per evaluation, the first one unbiased."""
    plan = round_robin_plan(1, EXPERTS, EXPERTS, 1)
    history = []
    for _ in range(evaluations + 1):
        loads, fraction = evaluate(plan, logits)
        bias = plan.gate_bias[0] if plan.gate_bias else (0.0,) * EXPERTS
        history.append((imbalance(loads), fraction, bias))
        plan = next_bias(plan, loads, fraction, options)
    return history


@settings(max_examples=8, deadline=None)
@given(st.floats(0.3, 1.5), st.integers(0, 1000))
def test_without_a_cap_the_bias_converges_to_balance_and_stays_in_bounds(
    zipf: float, seed: int
) -> None:
    options = GatingOptions(max_bias=0.5, max_margin=None, max_rerouted_fraction=None)
    history = run(fixed_logits(zipf, seed), options, evaluations=30)
    for _, _, bias in history:
        assert max(abs(b) for b in bias) <= options.max_bias + 1e-12
    before = history[0][0]
    late = [value for value, _, _ in history[-8:]]
    assert max(late) < 1 + 0.35 * (before - 1)  # most of the imbalance is gone ...
    assert max(late) - min(late) < 0.05  # ... and it stays there: no oscillation
    steps = [
        max(abs(a - b) for a, b in zip(history[i][2], history[i - 1][2], strict=True))
        for i in range(len(history) - 5, len(history))
    ]
    # the bias has settled: two experts with near-identical gate scores may still trade a few
    # tokens back and forth, a cycle far smaller than the bias itself
    assert max(steps) < 0.05 * max(abs(b) for b in history[-1][2])


@settings(max_examples=8, deadline=None)
@given(st.floats(0.5, 1.5), st.integers(0, 1000), st.sampled_from([0.05, 0.1, 0.2]))
def test_with_a_cap_the_measured_price_stays_under_it(zipf: float, seed: int, cap: float) -> None:
    options = GatingOptions(max_rerouted_fraction=cap)
    history = run(fixed_logits(zipf, seed), options, evaluations=15)
    fractions = [fraction for _, fraction, _ in history]
    assert max(fractions) <= cap
    assert history[-1][0] < history[0][0]  # and the bias still bought some balance


def test_without_skew_a_leftover_bias_decays_to_what_the_sample_itself_needs() -> None:
    logits = fixed_logits(0.0, seed=3)  # no popularity: only the sample's own noise is uneven
    options = GatingOptions(damping=0.2, max_margin=None, max_rerouted_fraction=None)
    plan = round_robin_plan(1, EXPERTS, EXPERTS, 1).model_copy(
        update={"version": 2, "gate_bias": ((0.05, -0.05, 0, 0, 0, 0, 0, 0),)}
    )
    leftover, _ = evaluate(plan, logits)
    magnitudes, imbalances = [], [imbalance(leftover)]
    for _ in range(40):
        loads, fraction = evaluate(plan, logits)
        imbalances.append(imbalance(loads))
        plan = next_bias(plan, loads, fraction, options)
        magnitudes.append(0.0 if plan.gate_bias is None else max(map(abs, plan.gate_bias[0])))
    assert max(magnitudes[-10:]) < 0.01  # from 0.05 down to a few thousandths
    assert max(imbalances[-10:]) < min(imbalances[0], 1.05)


@pytest.mark.parametrize("zipf", [0.5, 1.0])
def test_the_guard_never_reroutes_a_confident_token_in_the_loop(zipf: float) -> None:
    logits = fixed_logits(zipf, seed=7)
    options = GatingOptions(max_margin=0.03, max_rerouted_fraction=None, max_bias=0.5)
    history = run(logits, options, evaluations=10)
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, TOP_K + 1).values
    close = (top[:, TOP_K - 1] - top[:, TOP_K] < 0.03).float().mean().item()
    for _, fraction, _ in history:
        assert fraction <= close + 1e-9  # only close tokens, each at most K of its K
    assert math.isfinite(history[-1][0])
