"""The contract's plan parser and validator read the shared fixtures as their README says.

The same files drive the operator's record and hand-off tests and the worker's /v1/plan tests
(`tests.plan_fixtures`): a plan document means one thing on both ends of the wire.
"""

from __future__ import annotations

import pytest

from moe_contract.plan import PlanError, parse_plan, validate_plan
from tests.plan_fixtures import (
    EXPERTS,
    FIXTURES,
    INVALID,
    LAYERS,
    UNPARSABLE,
    VALID,
    WORLD,
    document,
    plan,
)


def test_every_fixture_is_catalogued() -> None:
    on_disk = {path.name for path in FIXTURES.glob("*.json")}
    assert on_disk == {*VALID, *UNPARSABLE, *INVALID}


@pytest.mark.parametrize("name", VALID)
def test_a_valid_fixture_parses_validates_and_is_its_own_document(name: str) -> None:
    parsed = plan(name)
    validate_plan(parsed, num_layers=LAYERS, num_experts=EXPERTS, world_size=WORLD)
    assert parsed.to_document() == document(name)  # what a writer sends is the file itself
    served = {**document(name), "digest": parsed.digest()}  # as GET /v1/plan answers
    assert parse_plan(served) == parsed


@pytest.mark.parametrize(("name", "field"), UNPARSABLE.items())
def test_an_unparsable_fixture_is_refused_naming_the_field(name: str, field: str) -> None:
    with pytest.raises(PlanError, match=field.replace("[", r"\[")):
        parse_plan((FIXTURES / name).read_text())


@pytest.mark.parametrize(("name", "field"), INVALID.items())
def test_an_invalid_fixture_parses_and_fails_validation_naming_the_field(
    name: str, field: str
) -> None:
    parsed = plan(name)
    assert parsed.version == 10  # never merely stale: the validator is what refuses it
    with pytest.raises(PlanError, match=field.replace("[", r"\[")):
        validate_plan(parsed, num_layers=LAYERS, num_experts=EXPERTS, world_size=WORLD)
