"""Issue 14 end to end: the seed's layout (4 ranks x 4 experts, 1 slot per rank) under skewed
traffic, on the shared local cluster (conftest.py), after test_e2e.py (its deployment is gone).

- `maxSlotsPerRank: 2`: Auto grows the plan to 2 slots per rank and balances with Replace, the
  workers take it online (same processes), and greedy completions are the same before and after.
- `maxSlotsPerRank: 1`: no slot can be added, Auto biases the gate; the workers count what the
  bias reroutes (`moe_gate_rerouted_total`), the operator shows it in status and its own metric,
  and the measured rerouted fraction stays under rebalancing.gating.maxReroutedFraction.

The figures (imbalance before and after, rerouted fraction, slots) are printed for
docs/rebalancing.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from moe_local.load import LoadGenerator, complete_once, zipf_prompts
from tests.e2e.conftest import VOCAB, checkpoint_source
from tests.e2e.helpers import E2E, wait_for
from tests.e2e.models import mixtral_spec, write_mixtral

pytestmark = pytest.mark.e2e

CHECKPOINT = "seed-mixtral"  # 2 layers, 4 experts, top-2
CAP = 0.1


def seed_like(
    models: Path, name: str, max_slots: int, cooldown: int, master_port: int
) -> dict[str, Any]:
    """The deployment; its own rendezvous port, as pods here are processes of one host beside
    the suite's other deployment."""
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                **mixtral_spec(2, VOCAB, experts=4),
                "source": checkpoint_source(models, CHECKPOINT),
            },
            "parallelism": {"expert": 4},
            "placement": {"slotsPerRank": 1, "maxSlotsPerRank": max_slots},
            "router": {"type": "None"},  # token-id prompts to the leader (smg takes only text)
            "rebalancing": {
                "method": "Auto",
                "imbalanceThreshold": 1.1,
                "evaluationWindowSeconds": 3,
                "consecutiveEvaluations": 2,
                "cooldownSeconds": cooldown,
                "gating": {"maxReroutedFraction": CAP},
            },
            "worker": {
                "gpusPerPod": 1,
                "masterPort": master_port,
                "backend": "gloo",
                "device": "cpu",
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "extraArgs": [
                    *("--traffic-batch", "2", "--traffic-seq-len", "16"),
                    *("--zipf", "1.5", "--traffic-interval", "0.02"),
                ],
            },
        },
    }


@pytest.fixture(scope="module")
def seed(e2e: E2E) -> E2E:
    write_mixtral(e2e.models / CHECKPOINT, layers=2, vocab_size=VOCAB, seed=3, experts=4)
    return e2e


def _up(e2e: E2E, name: str, max_slots: int, cooldown: int, master_port: int) -> E2E:
    env = dataclasses.replace(e2e, name=name)
    env.apply(seed_like(env.models, name, max_slots, cooldown, master_port))
    wait_for(f"{name}: 4 workers Ready", env.all_ready, 120)
    return env


def _down(env: E2E) -> None:
    env.kubectl("delete", "moedeployment", env.name, "-n", env.namespace, "--wait=false")
    wait_for(f"{env.name}: pods gone", lambda: not env.pods(), 90)


def _plan(env: E2E) -> dict[str, Any] | None:
    """The plan status once the workers serve a rebalanced plan (version >= 2)."""
    plan = env.status().get("plan") or {}
    ok = plan.get("version", 0) >= 2 and plan.get("appliedVersion") == plan["version"]
    return plan if ok else None


def _answers(env: E2E, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    url = wait_for("the -api Service has a ready endpoint", env.api_url, 60)
    client = LoadGenerator(url, CHECKPOINT, prompts, max_tokens=6)
    answers = []
    for index in range(len(prompts)):
        status, answer = complete_once(url, client.body(index))
        assert status == 200, answer
        answers.append(tuple(answer["choices"][0]["token_ids"]))
    return answers


def test_spare_memory_grows_slots_and_balances_by_replace_with_outputs_unchanged(
    seed: E2E,
) -> None:
    env = _up(seed, "seed-grow", max_slots=2, cooldown=600, master_port=29510)
    try:
        before = env.all_ready()
        assert before is not None
        prompts = zipf_prompts(4, vocab_size=VOCAB, length=10, exponent=1.5, seed=11)
        reference = _answers(env, prompts)
        plan = wait_for("a grown plan applied", lambda: _plan(env), 120)
        document = env.plan_document()
        assert document is not None and document["slotsPerRank"] == 2, document
        assert "gateBias" not in document and plan["method"] == "Replace"
        last = env.status()["lastRebalance"]
        assert last["method"] == "Replace" and "grown 1 -> 2" in last["note"], last
        assert env.all_ready() == before  # same pods, same processes: online
        assert _answers(env, prompts) == reference  # the switch changed no output

        def measured() -> float | None:
            value = env.status().get("imbalance")
            status = env.status()
            ok = value not in (None, "-") and status["plan"]["appliedVersion"] == plan["version"]
            return float(value) if ok else None

        env.wait_timer_runs(8)  # a few windows wholly on the grown plan
        after = wait_for("imbalance on the grown plan", measured, 60)
        print(
            f"\n[e2e] seed-like 4x4, maxSlotsPerRank 2: slots per rank 1 -> 2 (Replace, "
            f"{last['slotsMoved']} slots moved), imbalance {last['imbalanceBefore']:.2f} -> "
            f"{after:.2f} measured (predicted {last['imbalanceAfter']:.2f}); outputs unchanged"
        )
        assert after < last["imbalanceBefore"]
    finally:
        _down(env)


def test_without_spare_memory_a_guarded_bias_stays_under_the_price_cap(seed: E2E) -> None:
    env = _up(seed, "seed-bias", max_slots=1, cooldown=0, master_port=29520)
    try:
        plan = wait_for("a gate-bias plan applied", lambda: _plan(env), 120)
        assert plan["method"] == "GatingBias"
        document = env.plan_document()
        assert document is not None and document["slotsPerRank"] == 1
        first = env.status()["lastRebalance"]
        # Windows measured under a bias: status.reroutedFraction and the operator's gauge.
        seen: list[dict[str, Any]] = []
        readings: list[dict[str, Any]] = []

        def priced() -> bool:
            status = env.status()
            rerouted = status.get("reroutedFraction")
            biased = (status.get("plan") or {}).get("method") == "GatingBias"
            if biased and rerouted and (not readings or rerouted != readings[-1]):
                readings.append(rerouted)
                seen.append({**rerouted, "imbalance": status.get("imbalance")})
            return len(seen) >= 5

        wait_for("5 windows priced under the bias", priced, 120, interval=1)
        peak = max(s["max"] for s in seen)
        assert peak > 0, seen  # the bias does reroute: the counters count it
        assert peak <= CAP, seen
        gauge = env.operator_metric(
            "moe_gate_rerouted_fraction",
            f'{{layer="0",moedeployment="{env.name}",namespace="{env.namespace}"}}',  # sorted
        )
        assert gauge is not None and 0 <= gauge <= CAP
        print(
            f"\n[e2e] seed-like 4x4, maxSlotsPerRank 1: GatingBias, imbalance "
            f"{first['imbalanceBefore']:.2f} before, {seen[-1]['imbalance']} after "
            f"{len(seen)} priced windows; rerouted fraction per window (worst layer) "
            f"{[round(s['max'], 3) for s in seen]}, cap {CAP}"
        )
    finally:
        _down(env)
