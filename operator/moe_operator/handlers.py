"""kopf handlers: thin shells. Parse the body, call the pure core, apply, write status.

A bad object never raises out of a handler (that would only make kopf retry the same mistake):
it gets SpecValid=False and phase Failed, and its children are left exactly as they were.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import kopf

from moe_operator import api, metrics
from moe_operator.kube import Cluster, load_client_config
from moe_operator.manifests import children
from moe_operator.reconcile import ensure_children, ready_replicas, rollout_in_progress
from moe_operator.status import Observed, compute_status
from moe_operator.validation import parse_spec

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
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 30
    load_client_config()
    memo.cluster = Cluster()


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
) -> None:
    generation = int(body.metadata.get("generation") or 0)
    parsed, problems = parse_spec(dict(spec))
    if parsed is None:
        _write_invalid(body, status, patch, [str(problem) for problem in problems], generation)
        return
    cluster: Cluster = memo.cluster
    state = ensure_children(
        cluster, name, namespace, parsed, adopt=lambda child: kopf.adopt(child, owner=body)
    )
    for change in state.changes:
        logger.info(change)
        kopf.info(body, reason="Reconciled", message=change)
    plan_status = dict(status.get("plan") or {})
    observed = Observed(
        generation=generation,
        workers=parsed.parallelism.world_size,
        statefulset_exists=True,
        ready_workers=ready_replicas(state.statefulset),
        rollout_in_progress=rollout_in_progress(state.statefulset),
        plan_version=state.plan.version,
        applied_plan_version=int(plan_status.get("appliedVersion") or 0),
        imbalance_threshold=parsed.rebalancing.imbalance_threshold,
        was_running=_was_running(status),
    )
    patch.status.update(compute_status(observed, status.get("conditions") or [], _now()))
    patch.status["plan"] = {
        **plan_status,
        "version": state.plan.version,
        "method": state.plan.method,
        "configMap": children.plan_configmap_name(name),
    }
    metrics.observe_workers(namespace, name, observed.ready_workers, observed.workers)


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
        _sync(body, spec, name, namespace, dict(status), patch, memo, logger)


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
    """Keep children in shape (a deleted StatefulSet comes back) and status current."""
    with metrics.reconcile_timer("refresh"):
        _sync(body, spec, name, namespace, dict(status), patch, memo, logger)
