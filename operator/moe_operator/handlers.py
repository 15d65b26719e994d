"""kopf handlers: thin shells. Parse the body, call the pure core, apply, write status.

A bad object never raises out of a handler (that would only make kopf retry the same mistake):
it gets SpecValid=False and phase Failed, and its children are left exactly as they were.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import kopf

from moe_operator import api, metrics
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.kube import Cluster, load_client_config
from moe_operator.manifests import children
from moe_operator.planning.detection import DetectionState
from moe_operator.rebalance import StepOutcome, Window, control_step
from moe_operator.reconcile import ensure_children, ready_replicas, rollout_in_progress, write_plan
from moe_operator.status import Observed, compute_status
from moe_operator.validation import parse_spec
from moe_operator.workers import PodWorkers
from moe_worker.plan import Plan

TIMER_SECONDS = float(os.environ.get("MOE_OPERATOR_TIMER_SECONDS", "5"))
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping stays under our API group's prefix, not kopf.zalando.org.
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # The CRD is installed before the operator (chart crds/); not scanning for new CRDs and
    # namespaces spares the operator cluster-wide read access to CustomResourceDefinitions.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 30
    load_client_config()
    memo.cluster = Cluster()
    memo.worker_images = WorkerImages.from_environ()
    logging.getLogger(__name__).info("default worker images: %s", memo.worker_images)


def _was_running(status: dict[str, Any]) -> bool:
    return status.get("phase") in ("Running", "Rebalancing", "Degraded")


def _write_invalid(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, problems: list[str], generation: int
) -> None:
    observed = Observed(generation=generation, workers=0, spec_problems=tuple(problems))
    patch.status.update(compute_status(observed, status.get("conditions") or [], _now()))
    if status.get("phase") != "Failed" or status.get("observedGeneration") != generation:
        kopf.warn(body, reason="InvalidSpec", message="; ".join(problems))


def _sync(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    status: dict[str, Any],
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger | kopf.Logger,
    *,
    control: bool,
) -> None:
    """Parse, keep the children in shape, run the balancing step if asked, write status."""
    generation = int(body.metadata.get("generation") or 0)
    parsed, problems = parse_spec(dict(spec))
    if parsed is None:
        _write_invalid(body, status, patch, [str(problem) for problem in problems], generation)
        return
    parsed = with_worker_image(parsed, memo.worker_images)
    cluster: Cluster = memo.cluster
    adopt = functools.partial(kopf.adopt, owner=body)
    children_state = ensure_children(cluster, name, namespace, parsed, adopt=adopt)
    _announce(body, logger, [("Normal", "Reconciled", change) for change in children_state.changes])
    ready = ready_replicas(children_state.statefulset)
    desired = children_state.plan
    applied = int((status.get("plan") or {}).get("appliedVersion") or 0)
    detection_state = DetectionState.from_dict(status.get("detection"))
    outcome = None
    if control and ready == parsed.parallelism.world_size:
        if "window" not in memo:
            memo.window = Window(started_at=time.time())
        outcome = control_step(
            parsed, desired, detection_state, memo.window,
            PodWorkers(cluster, namespace, name, parsed),
            ConfigMapStore(cluster, name, namespace, adopt), time.time(),
        )  # fmt: skip
        _announce(body, logger, outcome.events)
        desired, detection_state = outcome.desired, outcome.state
        if outcome.applied_version is not None:
            applied = outcome.applied_version
    observed = Observed(
        generation=generation,
        workers=parsed.parallelism.world_size,
        statefulset_exists=True,
        ready_workers=ready,
        rollout_in_progress=rollout_in_progress(children_state.statefulset),
        plan_version=desired.version,
        applied_plan_version=applied,
        imbalance_threshold=parsed.rebalancing.imbalance_threshold,
        loads_problem=_loads_problem(memo.get("window"), ready, parsed.parallelism.world_size),
        handoff_problem=outcome.handoff_problem if outcome else None,
        was_running=_was_running(status),
        balance_note=_balance_note(desired),
    )
    _write_status(patch, status, name, namespace, observed, desired, detection_state, outcome,
                  memo.get("window"))  # fmt: skip


def _announce(
    body: kopf.Body, logger: logging.Logger | kopf.Logger, events: list[tuple[str, str, str]]
) -> None:
    for kind, reason, message in events:
        (kopf.warn if kind == "Warning" else kopf.info)(body, reason=reason, message=message)
        logger.info("%s: %s", reason, message)


def _write_status(
    patch: kopf.Patch,
    status: dict[str, Any],
    name: str,
    namespace: str,
    observed: Observed,
    desired: Plan,
    detection_state: DetectionState,
    outcome: StepOutcome | None,
    window: Window | None,
) -> None:
    """Status fields and the operator's metrics, from one set of observations."""
    per_layer = window.last_layer_imbalance if window else ()
    observed = dataclasses.replace(observed, worst_imbalance=max(per_layer) if per_layer else None)
    patch.status.update(compute_status(observed, status.get("conditions") or [], _now()))
    patch.status["plan"] = {
        "version": desired.version,
        "appliedVersion": observed.applied_plan_version,
        "method": desired.method,
        "configMap": children.plan_configmap_name(name),
    }
    patch.status["detection"] = detection_state.to_dict()
    metrics.observe_workers(namespace, name, observed.ready_workers, observed.workers)
    metrics.observe_plan(namespace, name, desired.version, observed.applied_plan_version)
    if per_layer:
        metrics.observe_imbalance(namespace, name, per_layer, observed.imbalance_threshold)
    if outcome and outcome.skipped:
        metrics.evaluations_skipped.labels(namespace, name, outcome.skipped).inc()
    if outcome and outcome.rebalance:
        patch.status["lastRebalance"] = outcome.rebalance.model_dump(by_alias=True)
        metrics.rebalances.labels(namespace, name, outcome.rebalance.method).inc()


def _loads_problem(window: Window | None, ready: int, world: int) -> str | None:
    """Why counters were not read: workers not ready, or the last window's reason (kept by the
    window, so the timer's runs between reads and the spec handlers all report the same)."""
    if ready < world:
        return f"{world - ready} of {world} workers not ready; token counters not read"
    return window.last_loads_problem if window else None


def _balance_note(plan: Plan) -> str:
    if plan.gate_bias is None:
        return ""
    return "; gate bias active: routing differs from the model's own choice of experts"


@dataclasses.dataclass
class ConfigMapStore:
    cluster: Cluster
    name: str
    namespace: str
    adopt: Callable[[dict[str, Any]], None]

    def write(self, plan: Plan) -> None:
        write_plan(self.cluster, self.name, self.namespace, plan, self.adopt)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    with metrics.reconcile_timer("reconcile"):
        _sync(body, spec, name, namespace, dict(status), patch, memo, logger, control=False)


@kopf.timer(*RESOURCE, interval=TIMER_SECONDS, initial_delay=TIMER_SECONDS)
def refresh(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Keep children in shape (a deleted StatefulSet comes back), balance load, refresh status."""
    with metrics.reconcile_timer("refresh"):
        _sync(body, spec, name, namespace, dict(status), patch, memo, logger, control=True)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(name: str, namespace: str, **_: Any) -> None:
    """Children go by owner references; only the operator's own metric series need dropping."""
    metrics.forget(namespace, name)
