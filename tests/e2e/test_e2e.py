"""moe-ep end to end on the local cluster: the whole loop, faults, bad input.

The tests share one cluster and one MoEDeployment (conftest.py) and run in file order: each
starts from the state the previous one left (a balanced deployment serving its current plan).
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
import urllib.parse
from typing import Any

import pytest

from tests.e2e.conftest import NAME
from tests.e2e.helpers import E2E, http_get, kill, process_gone, wait_for

pytestmark = pytest.mark.e2e


def _float(text: str | None) -> float | None:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def test_whole_loop(e2e: E2E) -> None:
    """Ready -> metrics read -> imbalance detected and alerted -> plan applied live -> balanced."""
    before = wait_for("workers Ready", e2e.all_ready, 60)
    assert all(w["restarts"] == 0 for w in before.values()), before
    assert e2e.status()["plan"]["version"] == 1 and e2e.configmap_version() == 1

    # The operator reads the counters and finds the skewed traffic unbalanced: status says so.
    def imbalanced() -> dict[str, Any] | None:
        status = e2e.status()
        value = _float(status.get("imbalance"))
        return status if value is not None and value > e2e.threshold else None

    status = wait_for("status.imbalance above the threshold", imbalanced, 60)
    assert status["phase"] == "Running", status
    assert e2e.condition("LoadsRead")["status"] == "True"
    balanced = e2e.condition("Balanced")
    assert balanced["status"] == "False" and balanced["reason"] == "AboveThreshold", balanced
    assert status["plan"]["version"] == 1, "rebalanced before consecutiveEvaluations were seen"

    # Prometheus fires MoEExpertLoadImbalance from the operator's gauge, before the rebalance.
    firing = wait_for("MoEExpertLoadImbalance firing", e2e.alerts, 60, interval=1)
    labels = firing[0]["labels"]
    assert labels["namespace"] == e2e.namespace and labels["moedeployment"] == NAME
    assert labels["layer"] in {"0", "1"} and labels["severity"] == "warning"
    assert e2e.status()["plan"]["version"] == 1, "the alert must fire before the rebalance"

    # A new plan, applied by the workers in place: no restart, same processes.
    def applied() -> dict[str, Any] | None:
        plan = e2e.status().get("plan") or {}
        ok = plan.get("version", 0) >= 2 and plan.get("appliedVersion") == plan["version"]
        return plan if ok else None

    plan = wait_for("plan >= 2 applied", applied, 90)
    assert e2e.configmap_version() == plan["version"]
    assert e2e.leader_plan_version() == plan["version"]
    assert e2e.worker_plan_versions() == [float(plan["version"])] * e2e.world
    last = e2e.status()["lastRebalance"]
    assert last["fromVersion"] == 1 and last["toVersion"] == 2 and last["method"] == "Replace"
    assert last["imbalanceBefore"] > e2e.threshold and last["slotsMoved"] > 0, last
    after = e2e.workers()
    for pod, worker in before.items():
        assert after[pod]["uid"] == worker["uid"], f"{pod} was replaced"
        assert after[pod]["pid"] == worker["pid"], f"{pod}'s worker process changed"
        assert after[pod]["restarts"] == 0, f"{pod} restarted"
    assert e2e.switches(0) == [(1, 2)], e2e.switches(0)

    # Measured imbalance on the new plan drops below the threshold; the alert resolves.
    def balanced_again() -> dict[str, Any] | None:
        condition = e2e.condition("Balanced")
        return condition if condition.get("status") == "True" else None

    condition = wait_for("Balanced True", balanced_again, 60)
    assert _float(e2e.status()["imbalance"]) <= e2e.threshold, condition
    wait_for(
        "MoEExpertLoadImbalance resolved",
        lambda: not e2e.alerts() and not e2e.alerts("pending"),
        90,
        interval=1,
    )
    assert e2e.status()["plan"]["version"] == plan["version"]


def test_killed_worker_rejoins_on_the_current_plan(e2e: E2E) -> None:
    """SIGKILL rank 1: its pod restarts, the group re-forms, Ready again, same plan version."""
    version = e2e.status()["plan"]["version"]
    assert version >= 2 and e2e.configmap_version() == version
    before = wait_for("workers Ready", e2e.all_ready, 30)
    victim = f"{NAME}-1"
    kill(before[victim]["pid"])

    def reformed() -> dict[str, Any] | None:
        workers = e2e.all_ready()
        if not workers or workers[victim]["restarts"] < 1:
            return None
        status = e2e.status()
        ready = e2e.condition("Ready")
        running = status.get("phase") == "Running" and ready.get("status") == "True"
        return workers if running else None

    after = wait_for("rank 1 restarted and the group Running again", reformed, 120)
    assert after[victim]["pid"] != before[victim]["pid"]
    assert after[victim]["uid"] == before[victim]["uid"]  # same pod, container restarted
    assert process_gone(before[victim]["pid"])
    # The others may have restarted too (their collectives broke); every rank now serves the
    # plan the ConfigMap holds, which is still the status' version: nothing went back.
    status = e2e.status()
    assert status["plan"]["version"] == version and status["plan"]["appliedVersion"] == version
    assert e2e.configmap_version() == version
    assert e2e.leader_plan_version() == version
    assert e2e.worker_plan_versions() == [float(version)] * e2e.world
    restarted = sorted(p for p in after if after[p]["pid"] != before[p]["pid"])
    print(f"\n[e2e] ranks restarted after killing {victim}: {restarted}")


STREAMING = {  # every readable window makes a new plan: GatingBias always moves the bias
    "method": "GatingBias",
    "imbalanceThreshold": 1.0,
    "consecutiveEvaluations": 1,
    "cooldownSeconds": 0,
    "gateBiasRate": 0.02,
    "maxGateBias": 0.5,
}


def _patch_rebalancing(e2e: E2E, rebalancing: dict[str, Any]) -> None:
    e2e.kubectl(
        "patch",
        "moed",
        NAME,
        "-n",
        e2e.namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"rebalancing": rebalancing}}),
    )


def test_hanging_metrics_skip_rebalancing_until_healed(e2e: E2E) -> None:
    """SIGSTOP rank 2 (its /metrics hangs): no plan while it hangs, LoadsRead False says why;
    SIGCONT: counters are read again and rebalancing resumes, with no restart."""
    before = wait_for("workers Ready", e2e.all_ready, 30)
    _patch_rebalancing(e2e, STREAMING)
    start = e2e.status()["plan"]["version"]
    # With these settings every readable window yields a plan: the control loop is live.
    wait_for("plans streaming", lambda: e2e.status()["plan"]["version"] >= start + 2, 60)

    victim = f"{NAME}-2"
    kill(before[victim]["pid"], signal.SIGSTOP)
    try:

        def skipped() -> dict[str, Any] | None:
            condition = e2e.condition("LoadsRead")
            return condition if condition.get("status") == "False" else None

        condition = wait_for("LoadsRead False", skipped, 30)
        assert condition["reason"] == "EvaluationSkipped", condition
        assert "rank 2" in condition["message"] or "timed out" in condition["message"], condition
        frozen = e2e.status()["plan"]["version"]
        # Hold while the worker hangs, before its readiness probe fails (3 x 5 s): no new plan.
        seen = []
        for _ in range(16):
            time.sleep(0.5)
            status = e2e.status()
            seen.append(
                (
                    status["plan"]["version"],
                    status.get("readyWorkers"),
                    e2e.condition("LoadsRead").get("status"),
                )
            )
        assert {version for version, _, _ in seen} == {frozen}, seen
        assert e2e.configmap_version() == frozen
        print(f"\n[e2e] while rank 2 hangs (plan, ready, LoadsRead): {seen}")
    finally:
        kill(before[victim]["pid"], signal.SIGCONT)

    def healed() -> bool:
        return (
            e2e.condition("LoadsRead").get("status") == "True"
            and e2e.status()["plan"]["version"] > frozen
        )

    wait_for("counters read and rebalancing again", healed, 60)
    after = wait_for("workers Ready", e2e.all_ready, 60)
    assert {p: (w["pid"], w["restarts"]) for p, w in after.items()} == {
        p: (w["pid"], w["restarts"]) for p, w in before.items()
    }, "a hang that healed must not restart anything"


def test_loads_read_is_not_true_while_a_worker_is_not_ready(e2e: E2E) -> None:
    """A worker hanging long enough to fail its readiness probe: the operator cannot read the
    counters (it does not even try), so LoadsRead must not claim they were read."""
    before = wait_for("workers Ready", e2e.all_ready, 30)
    victim = f"{NAME}-3"
    kill(before[victim]["pid"], signal.SIGSTOP)
    try:
        wait_for("rank 3 NotReady", lambda: e2e.status().get("readyWorkers") == e2e.world - 1, 40)
        time.sleep(3)  # a few timer runs with 3/4 ready
        condition = e2e.condition("LoadsRead")
        status = e2e.status()
    finally:
        kill(before[victim]["pid"], signal.SIGCONT)
    wait_for("workers Ready again", e2e.all_ready, 60)
    wait_for("Running again", lambda: e2e.status().get("phase") == "Running", 30)
    assert status["phase"] == "Degraded", status
    assert condition.get("status") != "True", condition


def test_operator_killed_after_writing_a_plan_converges(e2e: E2E) -> None:
    """SIGKILL the operator right after it writes a new plan to the ConfigMap: the restarted
    operator carries on from that plan; versions never go back; no version applied twice."""
    samples: list[tuple[int, int, int | None]] = []  # (status version, applied, ConfigMap)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                plan = e2e.status().get("plan") or {}
                samples.append(
                    (plan.get("version", 0), plan.get("appliedVersion", 0), e2e.configmap_version())
                )
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        pid = wait_for("operator Ready", e2e.operator_pid, 30)
        seen = e2e.configmap_version()
        assert seen is not None
        # Poll the ConfigMap tightly; kill the moment a newer plan lands in it.
        deadline = time.monotonic() + 30
        while (written := e2e.configmap_version()) == seen:
            assert time.monotonic() < deadline, "no new plan within 30 s"
            time.sleep(0.02)
        kill(pid)
        at_kill = {
            "configMap": written,
            "status": e2e.status()["plan"],
            "leader": e2e.leader_plan_version(),
        }
        new_pid = wait_for(
            "operator restarted", lambda: (p := e2e.operator_pid()) and p != pid and p, 60
        )
        assert process_gone(pid) and new_pid != pid
        # The restarted operator goes on from the plan it had written: the next is newer still.
        wait_for("a plan after the restart", lambda: e2e.status()["plan"]["version"] > written, 60)
        # Calm down (no new plans) and converge: one plan everywhere.
        _patch_rebalancing(e2e, {"enabled": False})

        def converged() -> int | None:
            plan = e2e.status()["plan"]
            version = plan["version"]
            same = (
                plan["appliedVersion"] == version
                and e2e.configmap_version() == version
                and e2e.leader_plan_version() == version
                and e2e.worker_plan_versions() == [float(version)] * e2e.world
            )
            return version if same else None

        final = wait_for("converged on one plan", converged, 60)
        time.sleep(4)  # a few timer runs later it has not moved
        assert converged() == final
    finally:
        stop.set()
        sampler.join(5)
    print(f"\n[e2e] operator killed with {at_kill}; converged on plan {final}")

    for key, label in (
        (0, "status.plan.version"),
        (1, "status.plan.appliedVersion"),
        (2, "ConfigMap plan version"),
    ):
        series = [s[key] for s in samples if s[key] is not None]
        assert series == sorted(series), f"{label} went back: {series}"
    # The leader logged every switch it made (over all its restarts): each version once, in
    # order, each from the one before: nothing applied twice, nothing skipped.
    switches = e2e.switches(0)
    targets = [to for _, to in switches]
    assert targets == list(range(2, final + 1)), switches
    assert all(frm == to - 1 for frm, to in switches), switches


def _current_document(e2e: E2E) -> dict[str, Any]:
    current = e2e.moed()
    assert current is not None
    return {
        "apiVersion": current["apiVersion"],
        "kind": current["kind"],
        "metadata": {"name": current["metadata"]["name"]},
        "spec": copy.deepcopy(current["spec"]),
    }


def _baseline(e2e: E2E) -> dict[str, Any]:
    sts = e2e.child("StatefulSet", NAME)
    assert sts is not None
    return {
        "workers": {p: (w["uid"], w["pid"], w["restarts"]) for p, w in e2e.workers().items()},
        "statefulset": (sts.metadata.uid, sts.metadata.generation),
        "plan": e2e.configmap_version(),
        "leader": e2e.leader_plan_version(),
    }


SCHEMA_REFUSED = [  # (field path, bad value, what the API server's error names)
    (("model", "layers"), 0, "spec.model.layers"),
    (("model", "dtype"), "int8", "spec.model.dtype"),
    (("rebalancing", "imbalanceThreshold"), 0.5, "spec.rebalancing.imbalanceThreshold"),
    (("worker", "backend"), "mpi", "spec.worker.backend"),
    (("parallelism", "expert"), "four", "spec.parallelism.expert"),
]


def _with(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(document)
    node = document["spec"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return document


def test_bad_input_is_refused_or_flagged_and_the_running_deployment_is_untouched(
    e2e: E2E,
) -> None:
    wait_for("workers Ready", e2e.all_ready, 30)
    good = _current_document(e2e)
    generation = e2e.moed()["metadata"]["generation"]
    baseline = _baseline(e2e)

    # Refused by the CRD's schema: on the running object and as a new object.
    for path, value, field in SCHEMA_REFUSED:
        for name in (NAME, "e2e-bad-schema"):
            document = _with(good, path, value)
            document["metadata"]["name"] = name
            result = e2e.apply(document, check=False)
            assert result.returncode != 0 and field in result.stderr, (name, result.stderr)
    assert e2e.moed("e2e-bad-schema") is None
    assert e2e.moed()["metadata"]["generation"] == generation

    # Accepted by the schema, flagged by the operator: SpecValid False naming the field.
    e2e.apply(_with(good, ("model", "topK"), 9))  # top-9 of 8 experts

    def flagged() -> dict[str, Any] | None:
        condition = e2e.condition("SpecValid")
        return condition if condition.get("status") == "False" else None

    condition = wait_for("SpecValid False on the running deployment", flagged, 30)
    assert "spec.model.topK" in condition["message"], condition
    assert e2e.status()["phase"] == "Failed"
    time.sleep(4)  # several timer runs on the bad spec
    assert _baseline(e2e) == baseline, "a flagged spec must leave the running workers alone"

    # A new object that is wrong across fields: flagged, nothing created for it.
    lonely = _with(good, ("parallelism", "expert"), 2)  # 2 ranks x 3 slots < 8 experts
    lonely["metadata"]["name"] = "e2e-bad-slots"
    e2e.apply(lonely)
    condition = wait_for(
        "SpecValid False on the new object",
        lambda: (c := e2e.condition("SpecValid", "e2e-bad-slots")).get("status") == "False" and c,
        30,
    )
    assert "spec.placement.slotsPerRank" in condition["message"], condition
    assert e2e.status("e2e-bad-slots")["phase"] == "Failed"
    for kind, name in (
        ("StatefulSet", "e2e-bad-slots"),
        ("ConfigMap", "e2e-bad-slots-plan"),
        ("Secret", "e2e-bad-slots-control"),
        ("Service", "e2e-bad-slots-workers"),
    ):
        assert e2e.child(kind, name) is None, f"{kind} {name} created for an invalid spec"
    e2e.kubectl("delete", "moed", "e2e-bad-slots", "-n", e2e.namespace, "--wait=true")

    # Fixing the running deployment's spec recovers it, still on the same pods and plan.
    e2e.apply(good)

    def recovered() -> bool:
        status = e2e.status()
        return (
            e2e.condition("SpecValid").get("status") == "True"
            and status.get("phase") == "Running"
            and e2e.condition("Ready").get("status") == "True"
        )

    wait_for("SpecValid True and Running again", recovered, 30)
    assert _baseline(e2e) == baseline


def test_delete_removes_every_child_and_process(e2e: E2E) -> None:
    workers = wait_for("workers Ready", e2e.all_ready, 30)
    pids = [w["pid"] for w in workers.values()]
    targets_dir = e2e.cluster.workdir / "prometheus" / "targets"
    assert len(list(targets_dir.glob(f"moe-ep-workers-{e2e.namespace}-*.json"))) == e2e.world
    e2e.kubectl("delete", "moed", NAME, "-n", e2e.namespace)
    children = (
        ("StatefulSet", NAME),
        ("Service", f"{NAME}-workers"),
        ("ConfigMap", f"{NAME}-plan"),
        ("Secret", f"{NAME}-control"),
    )

    def all_gone() -> bool:
        return (
            e2e.moed() is None
            and all(e2e.child(kind, name) is None for kind, name in children)
            and not e2e.pods()
            and all(process_gone(pid) for pid in pids)
        )

    wait_for("the MoEDeployment, its children and worker processes gone", all_gone, 90)
    assert not list(targets_dir.glob(f"moe-ep-workers-{e2e.namespace}-*.json"))
    # The operator dropped the deployment's series (Prometheus marks them stale on next scrape).
    series = f'moe_layer_imbalance_ratio{{moedeployment="{NAME}"}}'
    query = urllib.parse.urlencode({"query": series})

    def series_gone() -> bool:
        code, body = http_get(f"{e2e.prometheus_url}/api/v1/query?{query}")
        return code == 200 and json.loads(body)["data"]["result"] == []

    wait_for("the operator's series for the deployment gone", series_gone, 30, interval=1)
