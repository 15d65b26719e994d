"""The price of a gate bias as the engine counts it: through the real EP engine (world 1, the same
routing and dispatch path as every rank), the per-layer counters behind
`moe_gate_rerouted_total{layer}` / `moe_gate_rerouted_weight_total{layer}` equal a recount from
the gate's own scores and the experts the tokens were actually sent to; a token whose margin is
not below the plan's gateMaxMargin is never sent anywhere else; the counters survive plan
switches and are exposed per layer.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_contract.plan import Plan, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import ep_prefill
from moe_worker.ep.engine import EPEngine
from moe_worker.metrics import WorkerMetrics
from moe_worker.models.weights import SyntheticWeights
from moe_worker.switch.mover import ExpertMover

SHAPE = ModelShape(
    layers=2,
    experts=6,
    top_k=2,
    hidden=32,
    ffn_hidden=48,
    heads=4,
    head_dim=8,
    kv_heads=2,
    vocab_size=64,
)
SOURCE = SyntheticWeights.for_shape(SHAPE, seed=11)
CPU = torch.device("cpu")


def unbiased(version: int = 1) -> Plan:
    return round_robin_plan(SHAPE.layers, SHAPE.experts, 1, SHAPE.experts, version=version)


def biased_plan(bias: list[list[float]], margin: float | None, version: int = 2) -> Plan:
    return unbiased().model_copy(
        update={"version": version, "gate_bias": tuple(map(tuple, bias)), "gate_max_margin": margin}
    )


class Recorder:
    """The gate's logits and the experts each token was dispatched to, per layer call."""

    def __init__(self, engine: EPEngine) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._logits: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(engine.model.layers):
            layer.gate.register_forward_hook(self._hook(index))
        route = engine.dispatcher.route

        def recording_route(layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor):  # type: ignore[no-untyped-def]
            self.calls.append((layer, self._logits.pop(layer), topk_ids_NK.clone()))
            return route(layer, x_ND, topk_ids_NK)

        engine.dispatcher.route = recording_route  # type: ignore[method-assign]

    def _hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(_module, _inputs, output: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
            self._logits[index] = output.detach().float().clone()

        return hook

    def recount(self, max_margin: float | None) -> tuple[list[int], list[float], int]:
        """(rerouted [L], lost probability [L], confident tokens rerouted) in plain Python."""
        rerouted, lost, confident_moved = [0] * SHAPE.layers, [0.0] * SHAPE.layers, 0
        for layer, logits, chosen in self.calls:
            probs = torch.softmax(logits.double(), -1).tolist()
            for row, ids in zip(probs, chosen.tolist(), strict=True):
                ranked = sorted(range(len(row)), key=lambda e: -row[e])
                unbiased = set(ranked[: SHAPE.top_k])
                moved = len(set(ids) - unbiased)
                rerouted[layer] += moved
                lost[layer] += sum(row[e] for e in unbiased) - sum(row[e] for e in ids)
                gap = row[ranked[SHAPE.top_k - 1]] - row[ranked[SHAPE.top_k]]
                if max_margin is not None and gap >= max_margin and moved:
                    confident_moved += 1
        return rerouted, lost, confident_moved


def prompts(seed: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=g).tolist()
    return [torch.randint(0, SHAPE.vocab_size, (n,), generator=g).tolist() for n in lengths]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.02, 0.1, 0.5]),
    margin=st.sampled_from([None, 0.0, 0.02, 0.1, 1.0]),
    two_batch=st.booleans(),
)
def test_the_engines_rerouted_counters_equal_a_recount_from_the_scores(
    seed: int, scale: float, margin: float | None, two_batch: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    bias = ((torch.rand(SHAPE.layers, SHAPE.experts, generator=g) * 2 - 1) * scale).tolist()
    engine = EPEngine(SOURCE, biased_plan(bias, margin), rank=0)
    recorder = Recorder(engine)
    ep_prefill(engine, prompts(seed, 5), CPU, two_batch)
    rerouted, lost = engine.reroutes()
    expected_rerouted, expected_lost, confident_moved = recorder.recount(margin)
    assert rerouted == expected_rerouted
    assert all(abs(a - b) < 1e-4 for a, b in zip(lost, expected_lost, strict=True))
    assert confident_moved == 0
    assert all(value >= 0 for value in lost)


def test_no_bias_costs_nothing_and_the_counters_survive_switches_and_are_exposed() -> None:
    engine = EPEngine(SOURCE, unbiased(), rank=0)
    metrics = WorkerMetrics(lambda: None, lambda: [], engine.reroutes)
    ep_prefill(engine, prompts(1, 4), CPU)
    assert engine.reroutes() == ([0, 0], [0.0, 0.0])  # unbiased routing reroutes nothing
    # A bias far larger than any gap, unguarded: most assignments move.
    strong = [[1.0, 1.0, -1.0, -1.0, -1.0, 1.0], [0.0] * SHAPE.experts]
    ExpertMover(engine).apply(biased_plan(strong, None))
    ep_prefill(engine, prompts(2, 4), CPU)
    first, _ = engine.reroutes()
    assert first[0] > 0 and first[1] == 0  # layer 1 has no bias
    ExpertMover(engine).apply(unbiased(version=3))
    ep_prefill(engine, prompts(3, 4), CPU)
    assert engine.reroutes()[0] == first  # no bias now: nothing added, nothing reset
    exposed = {
        (s.name, s.labels["layer"]): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name.startswith("moe_gate_rerouted")
    }
    assert exposed[("moe_gate_rerouted_total", "0")] == first[0]
    assert exposed[("moe_gate_rerouted_total", "1")] == 0
    assert exposed[("moe_gate_rerouted_weight_total", "0")] > 0
