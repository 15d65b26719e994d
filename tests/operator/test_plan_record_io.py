"""Writing the plan record: preconditions, lost races, the single-key layout, pruning.

`reconcile` against an in-memory stand-in for the API server's ConfigMap semantics
(resourceVersion preconditions, merge patches that drop null keys); kmock and the real server
run the same code in tests/kmock and tests/integration.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest

from moe_contract.plan import parse_plan
from moe_operator.api import MoEDeploymentSpec
from moe_operator.kube import Conflict
from moe_operator.manifests import children
from moe_operator.planning.ledger import Ledger
from moe_operator.reconcile import (
    Owner,
    ensure_plan,
    keys_in_use,
    plan_from_configmap,
    prune_plan_keys,
)
from tests.plan_fixtures import FIXTURES, UNPARSABLE, VALID, plan

SPEC = MoEDeploymentSpec.model_validate(
    {
        "model": {"layers": 2, "expertsPerLayer": 4, "topK": 1},
        "parallelism": {"expert": 2},
        "placement": {"slotsPerRank": 2},
    }
)
KEY = children.plan_shape(SPEC).key
UID = "uid-1"


def adopt(body: dict[str, Any]) -> None:
    body["metadata"]["ownerReferences"] = [{"uid": UID, "controller": True}]


OWNER = Owner("m", "ns", UID, adopt)


def merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class ConfigMaps:
    """ConfigMaps as the API server keeps them, with a hook that runs before a write."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.versions = itertools.count(1)
        self.before_write: list[Any] = []
        self.writes = 0

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(name))

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._hook()
        name = body["metadata"]["name"]
        if name in self.objects:
            raise Conflict("exists")
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(next(self.versions))
        self.objects[name] = body
        return copy.deepcopy(body)

    def patch(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._hook()
        name = body["metadata"]["name"]
        current = self.objects[name]
        wanted = body["metadata"].get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise Conflict("changed")
        patched = merge(
            current, {**body, "metadata": {**body["metadata"], "resourceVersion": None}}
        )
        patched["metadata"]["resourceVersion"] = str(next(self.versions))
        self.objects[name] = patched
        return copy.deepcopy(patched)

    def _hook(self) -> None:
        self.writes += 1
        if self.before_write:
            self.before_write.pop(0)(self)


def stored_plan(cms: ConfigMaps, key: str = KEY) -> dict[str, Any]:
    return json.loads(cms.objects["m-plan"]["data"][key])


def no_leader() -> None:
    return None


def test_a_lost_race_is_decided_again_on_what_won() -> None:
    """Someone (a second operator, a user) wrote plan 7 between our read and our write: the
    precondition fails, the ConfigMap is read again, and plan 7 (newer) is kept, not overwritten."""
    cms = ConfigMaps()
    shape = children.plan_shape(SPEC)

    def someone_else(cms: ConfigMaps) -> None:
        plan = shape.round_robin(7)
        body = children.build_plan_configmap("m", {KEY: plan})
        adopt(body)
        body["metadata"]["resourceVersion"] = "999"
        cms.objects["m-plan"] = body

    configmap = {"metadata": {"name": "m-plan", "resourceVersion": "0", "ownerReferences": [
        {"uid": UID, "controller": True}]}, "data": {KEY: "{not json"}}  # fmt: skip
    cms.objects["m-plan"] = copy.deepcopy(configmap)
    cms.before_write.append(someone_else)
    stored, choice, _ = ensure_plan(cms, OWNER, SPEC, Ledger(3, 3, ""), no_leader, configmap)
    assert choice.plan.version == 7 and not choice.write
    assert stored_plan(cms)["version"] == 7 and parse_plan(stored["data"][KEY]).version == 7


def test_a_record_that_keeps_changing_is_left_to_the_next_run() -> None:
    cms = ConfigMaps()
    configmap = {"metadata": {"name": "m-plan", "resourceVersion": "0", "ownerReferences": [
        {"uid": UID, "controller": True}]}, "data": {}}  # fmt: skip
    cms.objects["m-plan"] = copy.deepcopy(configmap)

    def churn(cms: ConfigMaps) -> None:
        cms.objects["m-plan"]["metadata"]["resourceVersion"] = str(next(cms.versions))

    cms.before_write.extend([churn] * 3)
    with pytest.raises(Conflict, match="keeps changing"):
        ensure_plan(cms, OWNER, SPEC, Ledger(3, 3, ""), no_leader, configmap)


def test_the_single_key_layout_is_copied_under_its_shape_key() -> None:
    """A ConfigMap written by an operator before one-key-per-shape: its plan.json is the record;
    it is kept (same version) and copied under the shape's key; plan.json stays while old pods
    (which mount every key) still run."""
    cms = ConfigMaps()
    plan = children.plan_shape(SPEC).round_robin(4)
    configmap = {"metadata": {"name": "m-plan", "resourceVersion": "0", "ownerReferences": [
        {"uid": UID, "controller": True}]}, "data": {"plan.json": plan.to_json()}}  # fmt: skip
    cms.objects["m-plan"] = copy.deepcopy(configmap)
    stored, choice, events = ensure_plan(cms, OWNER, SPEC, Ledger(4, 4, ""), no_leader, configmap)
    assert choice.plan == plan and events == ()
    assert stored["data"] == {"plan.json": plan.to_json(), KEY: plan.to_json()}
    old_pod = {"spec": {"volumes": [{"name": "plan", "configMap": {"name": "m-plan"}}]}}
    assert keys_in_use([old_pod]) is None
    assert prune_plan_keys(cms, OWNER, SPEC, stored, [old_pod]) == stored
    new_pod = {"spec": children.build_statefulset("m", "ns", SPEC)["spec"]["template"]["spec"]}
    pruned = prune_plan_keys(cms, OWNER, SPEC, stored, [new_pod])
    assert set(pruned["data"]) == {KEY}
    assert parse_plan(pruned["data"][KEY]) == plan


def test_a_new_record_is_created_owned() -> None:
    cms = ConfigMaps()
    stored, choice, _ = ensure_plan(cms, OWNER, SPEC, Ledger(), no_leader, None)
    assert choice.plan.version == 1 and children.controlled_by(stored, UID)
    assert stored["metadata"]["annotations"][children.PLAN_VERSION_ANNOTATION] == "1"


@pytest.mark.parametrize("name", VALID)
def test_a_shared_fixture_reads_back_from_the_configmap(name: str) -> None:
    configmap = {"data": {KEY: (FIXTURES / name).read_text()}}
    assert plan_from_configmap(configmap, KEY) == (plan(name), "")


@pytest.mark.parametrize(("name", "field"), UNPARSABLE.items())
def test_an_unparsable_shared_fixture_is_an_unreadable_record(name: str, field: str) -> None:
    """The worker answers 400 to these; in the ConfigMap they are a record to repair."""
    configmap = {"data": {KEY: (FIXTURES / name).read_text()}}
    stored, problem = plan_from_configmap(configmap, KEY)
    assert stored is None and problem.startswith("holds an unreadable plan") and field in problem
