"""Issue 23 end to end: 2 groups x 2 ranks of a tiny checkpoint behind the smg router, on the
local cluster (the router's pods are processes too, discovering the leaders through the
Kubernetes API with their ServiceAccount's token), under a steady load of greedy requests sent
through `<name>-api` (the router). One deployment goes through every event in sequence
(`moe_local.availability`): a pod template change (surge: a new group serves before an old one
drains), a kill -9 of one group's leader, scale 2 -> 1 and 1 -> 2 (`kubectl scale`). No
request fails and every answer equals the reference answered before the events.
"""

from __future__ import annotations

import pytest

from moe_local import availability
from moe_local.install import apply_document, kubectl
from tests.e2e.conftest import NAMESPACE, Local
from tests.e2e.helpers import wait_for

pytestmark = pytest.mark.e2e


def test_groups_behind_the_router_lose_no_request(local: Local) -> None:
    availability.write_checkpoint(local.models)
    kubeconfig = local.cluster.kubeconfig
    apply_document(kubeconfig, NAMESPACE, availability.deployment(local.models))
    run = availability.Availability(kubeconfig, local.cluster.client(), NAMESPACE)
    try:
        run.start_load()
        leaders = run.leaders()
        assert sorted(leaders) == ["avail-0", "avail-g1-0"]
        status = run.moed()["status"]
        assert status["replicas"] == status["readyReplicas"] == 2
        assert status["labelSelector"] == "moe-ep.io/deployment=avail,moe-ep.io/role=leader"
        events = run.run_all()
    finally:
        answers = run.stop_load() if run.load is not None else []
    table = "\n".join([availability.HEADER, *(event.row() for event in events)])
    print(f"\n[e2e] {len(answers)} requests through the router\n{table}")
    for event in events:
        assert event.failed == 0 and event.wrong == 0, (event.what, event.errors)
        assert event.requests > 0, event.what  # the load went on through every event
    template, _, _, single, grow = events
    assert template.new_group_traffic_s is not None and grow.new_group_traffic_s is not None
    assert single.new_group_traffic_s is not None  # replicas 1: the new group served first
    assert len(answers) > 0 and all(a.ok for a in answers)
    both = {name for name, pod in run.leaders().items() if run.finished(pod) > 0}
    assert len(both) == 2, both  # after 1 -> 2, both groups answer
    kubectl(kubeconfig, "delete", "moed", availability.NAME, "-n", NAMESPACE, "--wait=false")
    wait_for("the deployment's pods gone", lambda: not run.pods(), 90)
