"""Routing by pod in the dispatcher (`Placement.slots_for` with a plan's ranksPerPod).

Pure tensor code, no process group: every rank's placement is built from one plan and fed the
same token ids. A token goes to a slot that holds its expert; each rank's draws follow its pod's
shares (`moe_contract.plan.pod_routes`); over all ranks every replica gets an even share of its
expert's tokens; and the planner's predicted cross-pod fraction is what the routing does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moe_contract.plan import Plan, PlanError, parse_plan, pod_routes, validate_plan
from moe_operator.planning import arrays
from moe_worker.ep.dispatch import Placement

SLOTS = (
    ((0, 1), (0, 2), (0, 3), (1, 2), (4, 5), (6, 7), (0, 4), (5, 6)),  # expert 0 x4, over 2 pods
)
EXPERTS, TOKENS = 8, 4096


def _plan(per_pod: int | None) -> Plan:
    return Plan(version=2, slotsPerRank=2, slots=SLOTS, method="Replace", ranksPerPod=per_pod)


def _route(plan: Plan, rank: int, ids_NK: torch.Tensor) -> torch.Tensor:
    return Placement.from_plan(plan, rank, EXPERTS).slots_for(0, ids_NK)


def _ids() -> torch.Tensor:
    return torch.randint(0, EXPERTS, (TOKENS, 2), generator=torch.Generator().manual_seed(0))


def test_every_token_reaches_a_slot_of_its_expert() -> None:
    ids = _ids()
    flat = torch.tensor([e for rank in SLOTS[0] for e in rank])
    for per_pod in (2, 4):
        for rank in range(8):
            slots = _route(_plan(per_pod), rank, ids)
            assert torch.equal(flat[slots], ids.reshape(-1))


def test_draws_follow_the_pods_shares() -> None:
    ids = torch.zeros(TOKENS, 1, dtype=torch.int64)  # every token to expert 0
    for per_pod in (2, 4):
        for rank in range(8):
            slots = _route(_plan(per_pod), rank, ids)
            shares = dict(pod_routes(SLOTS[0], per_pod, rank // per_pod)[0])
            counts = torch.bincount(slots, minlength=16).double() / TOKENS
            for slot in range(16):
                assert abs(counts[slot].item() - shares.get(slot, 0.0)) < 2e-3


def test_replicas_share_evenly_and_the_cross_pod_fraction_is_the_planners() -> None:
    ids = _ids()
    per_pod, flat = 4, [e for rank in SLOTS[0] for e in rank]
    load = torch.bincount(ids.reshape(-1), minlength=EXPERTS).double() * 8  # 8 ranks send
    received = torch.zeros(16, dtype=torch.float64)
    leaving = 0
    for rank in range(8):
        slots = _route(_plan(per_pod), rank, ids)
        received += torch.bincount(slots, minlength=16).double()
        leaving += int(((slots // 2) // per_pod != rank // per_pod).sum())
    replicas = torch.bincount(torch.tensor(flat), minlength=EXPERTS)
    expected = load[flat] / replicas[flat]
    assert torch.allclose(received, expected, rtol=0.02)
    predicted = arrays.cross_pod_fraction(np.asarray(SLOTS), load.numpy()[None], per_pod)[0]
    assert abs(leaving / load.sum().item() - predicted) < 0.01


def test_without_pods_the_split_is_the_old_one() -> None:
    ids = _ids()
    plain = Placement.from_plan(_plan(None), 3, EXPERTS)
    assert plain.route_bounds_LEM is None
    one_pod = Placement.from_plan(_plan(8), 3, EXPERTS)  # a single pod: no pod routing either
    assert torch.equal(plain.slots_for(0, ids), one_pod.slots_for(0, ids))


def test_plan_fixture_with_pods_parses_and_keeps_its_digest_field() -> None:
    plan = parse_plan(_plan(4).to_json())
    assert plan.ranks_per_pod == 4
    assert "ranksPerPod" not in _plan(None).to_document()  # old plans' digests unchanged


def test_the_fixtures_with_ranks_per_pod() -> None:
    fixtures = Path(__file__).parent.parent / "fixtures" / "plans"
    shape = {"num_layers": 2, "num_experts": 4, "world_size": 4}
    pods = parse_plan((fixtures / "pods-2layer-4expert-4rank-2slots.json").read_text())
    validate_plan(pods, **shape)
    assert pods.ranks_per_pod == 2
    broken = parse_plan((fixtures / "invalid-ranks-per-pod.json").read_text())
    with pytest.raises(PlanError, match="ranksPerPod: 3 does not divide the world size 4"):
        validate_plan(broken, **shape)
