"""The plan fixtures of tests/fixtures/plans, catalogued once for every side that reads them.

The contract's parser and validator (tests/contract), the operator's record and hand-off
(tests/planning, tests/operator) and the worker's /v1/plan (tests/worker) read the same files,
so a plan document means the same thing on both ends of the wire. All fit a model of `LAYERS`
layers x `EXPERTS` experts on a world of `WORLD` ranks (the files' README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_contract.plan import Plan, parse_plan

FIXTURES = Path(__file__).parent / "fixtures" / "plans"
LAYERS, EXPERTS, WORLD = 2, 4, 4

VALID = (
    "round-robin-2layer-4expert-4rank.json",
    "replicated-2layer-4expert-4rank-2slots.json",
    "gate-bias-2layer-4expert-4rank.json",
    "pods-2layer-4expert-4rank-2slots.json",
)
UNPARSABLE = {  # file -> the field `parse_plan`'s error names (the worker answers 400)
    "invalid-missing-version.json": "version",
    "invalid-unknown-field.json": "placement",
    "invalid-digest.json": "digest",
}
INVALID = {  # file -> the field `validate_plan`'s error names (the worker answers 422)
    "invalid-wrong-layer-count.json": "slots",
    "invalid-wrong-world-size.json": "slots[0]",
    "invalid-unknown-expert.json": "slots[0][3][0]",
    "invalid-missing-expert.json": "slots[0]",
    "invalid-slot-count-mismatch.json": "slots[0][3]",
    "invalid-gate-bias-length.json": "gateBias[0]",
    "invalid-ranks-per-pod.json": "ranksPerPod",
}


def document(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def plan(name: str) -> Plan:
    return parse_plan((FIXTURES / name).read_text())
