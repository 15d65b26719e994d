"""kopf handlers: thin shells. Parse the body, call the pure core, apply, write status.

Three rules hold for every handler run:

- A bad object never raises out of a handler (that would only make kopf retry the same
  mistake): it gets SpecValid=False and phase Failed, and its children are left exactly as they
  were.
- One writer per object: create/update/resume and the timer run in kopf's thread pool and could
  overlap; a per-object lock (in kopf's per-object memo) serialises them, and each run starts
  from the status the previous one wrote (kopf's body may be older).
- No error stops an object's handling: the operator writes status itself (a status patch that
  fails inside kopf would end the object's timer for good), and any failure is logged, counted in
  `moe_operator_reconcile_errors_total`, posted as an Event and shown as Reconciled=False; the
  next run starts afresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import kopf

from moe_contract import env as worker_env
from moe_contract.plan import Plan
from moe_operator import api, metrics
from moe_operator.failures import startup_failure
from moe_operator.group import (
    RECOVERING_REASON,
    GroupState,
    ReplacementBackoff,
    gang_failure,
    group_state,
)
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.kube import Cluster, Conflict, load_client_config, secret_value
from moe_operator.manifests import children
from moe_operator.planning.detection import DetectionState
from moe_operator.planning.ledger import LEGACY_DETECTION_FIELDS, Ledger
from moe_operator.planning.record import PlanShape
from moe_operator.rebalance import PlanStoreConflict, StepOutcome, Window, control_step
from moe_operator.reconcile import (
    ChildrenState,
    Owner,
    delete_pods,
    ensure_children,
    owned_pods,
    ready_replicas,
    record_notes,
    write_plan,
)
from moe_operator.status import Observed, compute_status, with_reconcile_error
from moe_operator.validation import parse_spec
from moe_operator.workers import PodWorkers

TIMER_SECONDS = float(os.environ.get("MOE_OPERATOR_TIMER_SECONDS", "5"))
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
LOCK_WAIT_SECONDS = 60.0  # a spec handler waits this long for the timer's run (a plan POST)
EventList = list[tuple[str, str, str]]  # (type, reason, message)


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
    # A deletion waits for a running refresh to return; kopf then rechecks only after this
    # (60 s by default), which held `kubectl delete` that long whenever a refresh was running.
    settings.background.cancellation_polling = min(TIMER_SECONDS, 2.0)
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 30
    load_client_config()
    memo.cluster = Cluster()
    memo.worker_images = WorkerImages.from_environ()
    logging.getLogger(__name__).info("default worker images: %s", memo.worker_images)


@dataclass(frozen=True)
class Call:
    """One handler run's view of its object, taken once at the start: a timer's body is a live
    view that a newer spec may change mid-run, and the generation reported must be the one of
    the spec acted on."""

    body: kopf.Body
    spec: dict[str, Any]
    generation: int
    uid: str
    name: str
    namespace: str
    memo: kopf.Memo
    logger: logging.Logger | kopf.Logger

    @classmethod
    def of(
        cls,
        body: kopf.Body,
        memo: kopf.Memo,
        logger: logging.Logger | kopf.Logger,
    ) -> Call:
        metadata = body.metadata
        generation = int(metadata.get("generation") or 0)  # before the spec: never newer than it
        return cls(
            body=body,
            spec=dict(body.spec),
            generation=generation,
            uid=str(metadata.get("uid") or ""),
            name=str(metadata.name),
            namespace=str(metadata.namespace),
            memo=memo,
            logger=logger,
        )

    @property
    def cluster(self) -> Cluster:
        return self.memo.cluster

    def announce(self, events: EventList) -> None:
        for kind, reason, message in events:
            (kopf.warn if kind == "Warning" else kopf.info)(
                self.body, reason=reason, message=message
            )
            self.logger.info("%s: %s", reason, message)


def _run(handler: str, call: Call, status: dict[str, Any], *, control: bool) -> None:
    """Serialise with the object's other handler runs; never let an error escape to kopf."""
    lock: threading.Lock = call.memo.setdefault("lock", threading.Lock())
    if not lock.acquire(timeout=0 if control else LOCK_WAIT_SECONDS):
        if control:
            return  # a spec handler is at work on this object; the next tick comes soon
        raise kopf.TemporaryError("another handler run holds this object", delay=TIMER_SECONDS)
    try:
        base = call.memo.get("status") or status  # ours is newer than kopf's body
        with metrics.reconcile_timer(handler):
            try:
                _sync(call, base, control=control)
            except Exception as error:
                _report_error(handler, call, base, error)
    finally:
        lock.release()


def _report_error(handler: str, call: Call, base: dict[str, Any], error: Exception) -> None:
    metrics.reconcile_errors.labels(handler).inc()
    message = f"{type(error).__name__}: {str(error)[:300]}"
    call.logger.exception("%s of %s/%s failed: %s", handler, call.namespace, call.name, message)
    try:
        kopf.warn(call.body, reason="ReconcileFailed", message=message)
    except Exception:  # no Event: the log, the metric and the condition still say it
        call.logger.exception("could not post the ReconcileFailed Event")
    try:
        conditions = with_reconcile_error(
            base.get("conditions") or [], message, call.generation, _now()
        )
        _write(call, {"conditions": conditions})
    except Exception:  # the API server may be the trouble; the next run tries again
        call.logger.exception("could not report the failure of %s", handler)


def _write(call: Call, status: dict[str, Any]) -> None:
    """Patch status ourselves and remember it for the next run."""
    call.memo.status = call.cluster.patch_status(call.namespace, call.name, status)


def _was_running(status: dict[str, Any]) -> bool:
    return status.get("phase") in ("Running", "Rebalancing", "Degraded") or any(
        item.get("type") == "Degraded" and item.get("status") == "True"
        for item in status.get("conditions") or []
    )


def _sync(call: Call, base: dict[str, Any], *, control: bool) -> None:
    """Parse, keep the children in shape, replace an outdated group, balance, write status."""
    parsed, problems = parse_spec(call.spec, name=call.name)
    if parsed is None:
        _write_invalid(call, base, [str(problem) for problem in problems])
        return
    parsed = with_worker_image(parsed, call.memo.worker_images)
    adopt = functools.partial(kopf.adopt, owner=call.body)
    owner = Owner(call.name, call.namespace, call.uid, adopt)
    cluster = call.cluster

    def workers(pods: list[dict[str, Any]]) -> PodWorkers:
        return PodWorkers(pods, parsed, call.namespace, call.name, functools.partial(_token, call))

    known = Ledger.from_status(base)  # a lost plan record never goes back past it
    state = ensure_children(
        cluster,
        owner,
        parsed,
        known,
        leader=lambda pods: workers(pods).served_plan(),
        pods=lambda statefulset: owned_pods(cluster, call.namespace, call.name, statefulset),
    )
    if state.conflicts:
        _write_conflicts(call, base, parsed, state)
        return
    assert state.statefulset is not None and state.plan is not None
    call.announce([("Normal", "Reconciled", change) for change in state.changes])
    call.announce(list(state.events))
    group = group_state(state.statefulset, state.pods)
    world = parsed.pods  # pods, not ranks: what the StatefulSet counts ready
    # Every pod there, none going, and as many ready (readyReplicas may lag the deletions).
    back = group.current >= world and not group.restarting
    recovering = _recovering(base, world, ready_replicas(state.statefulset), back)
    gang = None if group.restarting or not group.observed else gang_failure(state.pods)
    backoff = ReplacementBackoff.from_status(base.get("recovery"))
    if group.stale:
        message = group.message(world)
        deleted = delete_pods(cluster, call.namespace, group.stale)
        call.announce([("Normal", "GroupRestart", f"deleted {deleted} pods together: {message}")])
    elif gang is not None:
        now = time.time()
        wait = backoff.wait_s(now)
        if wait > 0:
            in_a_row = backoff.in_a_row(now)
            recovering = gang.held_message(in_a_row, wait)
            event = ("Warning", "GroupBackoff", recovering)
            _announce_once(call, base, event, key=f"replaced {in_a_row} times in a row")
        else:
            recovering = gang.message(world)
            deleted = delete_pods(cluster, call.namespace, gang.pods)
            call.announce([("Warning", RECOVERING_REASON, f"deleted {deleted} pods: {recovering}")])
            group = dataclasses.replace(group, terminating=group.terminating + deleted)
            backoff = backoff.replaced(now)
    detection_state, last_rebalance = _restored(base, known, state)
    ready = ready_replicas(state.statefulset)
    desired, ledger, outcome = state.plan, known.recorded(state.plan), None
    if control and ready == world and group.settled:
        if "window" not in call.memo:
            call.memo.window = Window(started_at=time.time())
        store = ConfigMapStore(cluster, owner, children.plan_shape(parsed), state.configmap)
        outcome = control_step(
            parsed, desired, ledger, detection_state, call.memo.window, workers(state.pods),
            store, time.time(),
        )  # fmt: skip
        call.announce(outcome.events)
        desired, ledger, detection_state = outcome.desired, outcome.ledger, outcome.state
        if outcome.rebalance is not None:
            last_rebalance = outcome.rebalance.model_dump(by_alias=True)
    restarting = (group.restarting or not group.observed) and recovering is None
    failure = None if restarting else startup_failure(state.pods)
    if failure is not None:
        recovering = None  # a refusal is no failure to recover from: the spec must change
    if failure is not None:
        event = ("Warning", failure.reason, failure.describe(world))
        _announce_once(call, base, event, key=failure.message)
    observed = Observed(
        generation=call.generation,
        workers=world,
        statefulset_exists=True,
        ready_workers=ready,
        # With OnDelete the controller never marks a revision current: the group's own state
        # (old pods, pods going, a template not yet seen) says whether a rollout is under way.
        rollout_in_progress=restarting,
        plan_version=ledger.desired,
        applied_plan_version=ledger.applied,
        imbalance_threshold=parsed.rebalancing.imbalance_threshold,
        max_rerouted_fraction=parsed.rebalancing.gating.max_rerouted_fraction,
        loads_problem=_loads_problem(call.memo.get("window"), ready, world, group),
        handoff_problem=outcome.handoff_problem if outcome else None,
        was_running=_was_running(base),
        balance_note=_balance_note(desired),
        group_restart=group.message(world) if restarting else None,
        recovering=recovering,
        startup_failure=failure,
        endpoint=children.api_endpoint(call.name, call.namespace, parsed),
        served_model_name=children.served_model_name(call.name, parsed),
    )
    key = children.plan_shape(parsed).key
    recovery = backoff.to_status() if backoff.replacements else None
    _write_status(
        call,
        base,
        observed,
        desired,
        ledger,
        detection_state,
        outcome,
        last_rebalance,
        key,
        recovery,
    )


def _recovering(base: dict[str, Any], pods: int, ready: int, back: bool) -> str | None:
    """The failure a group brought back whole is recovering from, as the last status said it,
    until all its pods are back (the old ones gone, new ones there) and ready."""
    if ready >= pods and back:
        return None
    for item in base.get("conditions") or []:
        if item.get("type") == "Degraded" and item.get("reason") == RECOVERING_REASON:
            return str(item.get("message") or "") or None
    return None


def _announce_once(call: Call, base: dict[str, Any], event: tuple[str, str, str], key: str) -> None:
    """An Event for a condition that lasts: once, not at every timer run. `key` is what makes
    it news: absent from the conditions the run before wrote."""
    if not any(key in (item.get("message") or "") for item in base.get("conditions") or []):
        call.announce([event])


def _token(call: Call) -> str | None:
    """The control token, from the deployment's own Secret only."""
    secret = call.cluster.get("Secret", call.namespace, children.token_secret_name(call.name))
    if not children.controlled_by(secret, call.uid):
        return None
    return secret_value(secret, worker_env.TOKEN_FILE_NAME)


def _restored(
    base: dict[str, Any], known: Ledger, state: ChildrenState
) -> tuple[DetectionState, dict[str, Any] | None]:
    """Detection state and last rebalance from status; when status lost the newest plan (the
    operator died between writing it and patching status), from the ConfigMap's annotations."""
    detection_state = DetectionState.from_dict(base.get("detection"))
    last_rebalance = base.get("lastRebalance")
    assert state.plan is not None
    notes = record_notes(state.configmap)
    record = notes.last_rebalance or {}
    lost = known.lost_in_status(state.plan.version, notes.version)
    if lost and record.get("toVersion") == state.plan.version:
        last_rebalance = record
        if notes.issued_at is not None:
            detection_state = dataclasses.replace(
                detection_state, last_rebalance_at=notes.issued_at
            )
    return detection_state, last_rebalance


def _write_invalid(call: Call, base: dict[str, Any], problems: list[str]) -> None:
    observed = Observed(generation=call.generation, workers=0, spec_problems=tuple(problems))
    _write(call, compute_status(observed, base.get("conditions") or [], _now()))
    if base.get("phase") != "Failed" or base.get("observedGeneration") != call.generation:
        kopf.warn(call.body, reason="InvalidSpec", message="; ".join(problems))


def _write_conflicts(
    call: Call, base: dict[str, Any], spec: api.MoEDeploymentSpec, state: ChildrenState
) -> None:
    observed = Observed(
        generation=call.generation,
        workers=spec.pods,
        statefulset_exists=state.statefulset is not None,
        ready_workers=ready_replicas(state.statefulset),
        conflicts=state.conflicts,
    )
    _write(call, compute_status(observed, base.get("conditions") or [], _now()))
    known = {item.get("message") for item in base.get("conditions") or []}
    if "; ".join(state.conflicts) not in known:
        call.announce([("Warning", "ChildConflict", conflict) for conflict in state.conflicts])


def _write_status(
    call: Call,
    base: dict[str, Any],
    observed: Observed,
    desired: Plan,
    ledger: Ledger,
    detection_state: DetectionState,
    outcome: StepOutcome | None,
    last_rebalance: dict[str, Any] | None,
    key: str,
    recovery: dict[str, Any] | None = None,
) -> None:
    """Status fields and the operator's metrics, from one set of observations."""
    window: Window | None = call.memo.get("window")
    per_layer = window.last_layer_imbalance if window else ()
    rerouted = window.last_rerouted_fraction if window else ()
    observed = dataclasses.replace(
        observed,
        worst_imbalance=max(per_layer) if per_layer else None,
        rerouted_fraction=rerouted,
        gate_bias_active=desired.gate_bias is not None,
    )
    status = compute_status(observed, base.get("conditions") or [], _now())
    status["plan"] = {
        "version": ledger.desired,
        "appliedVersion": ledger.applied,
        "digest": ledger.digest,
        "method": desired.method,
        "configMap": children.plan_configmap_name(call.name),
        "configMapKey": key,
    }
    status["detection"] = {
        "aboveCount": detection_state.above_count,
        "lastRebalanceAt": detection_state.last_rebalance_at,
        **dict.fromkeys(LEGACY_DETECTION_FIELDS),  # one copy of the versions: status.plan
    }
    if last_rebalance is not None:
        status["lastRebalance"] = last_rebalance
    if recovery is not None:
        status["recovery"] = recovery
    _write(call, status)
    namespace, name = call.namespace, call.name
    metrics.observe_workers(namespace, name, observed.ready_workers, observed.workers)
    metrics.observe_plan(namespace, name, ledger.desired, ledger.applied)
    if per_layer:
        metrics.observe_imbalance(namespace, name, per_layer, observed.imbalance_threshold)
    metrics.observe_rerouted(namespace, name, rerouted)
    if outcome and outcome.skipped:
        metrics.evaluations_skipped.labels(namespace, name, outcome.skipped).inc()
    if outcome and outcome.rebalance:
        metrics.rebalances.labels(namespace, name, outcome.rebalance.method).inc()


def _loads_problem(window: Window | None, ready: int, world: int, group: GroupState) -> str | None:
    """Why counters were not read: workers not ready, a group restart, or the last window's
    reason (kept by the window, so every run between two reads reports the same)."""
    if ready < world:
        return f"{world - ready} of {world} workers not ready; token counters not read"
    if not group.settled:
        return "the group restarts for a new pod template; token counters not read"
    return window.last_loads_problem if window else None


def _balance_note(plan: Plan) -> str:
    if plan.gate_bias is None:
        return ""
    return "; gate bias active: routing differs from the model's own choice of experts"


@dataclass
class ConfigMapStore:
    """The plan's durable record for `rebalance.control_step`: the ConfigMap's key for the
    spec's shape, written with the ConfigMap last read as the precondition."""

    cluster: Cluster
    owner: Owner
    shape: PlanShape
    configmap: dict[str, Any] | None

    def write(self, plan: Plan, record: api.RebalanceRecord | None, issued_at: float) -> None:
        notes = {}
        if record is not None:
            notes[children.LAST_REBALANCE_ANNOTATION] = json.dumps(
                record.model_dump(by_alias=True), separators=(",", ":")
            )
            notes[children.ISSUED_AT_ANNOTATION] = repr(issued_at)
        try:
            self.configmap = write_plan(
                self.cluster, self.owner, self.shape, plan, self.configmap, notes
            )
        except Conflict as error:
            raise PlanStoreConflict(f"plan ConfigMap: {error}") from None


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(
    body: kopf.Body, status: kopf.Status, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    _run("reconcile", Call.of(body, memo, logger), dict(status), control=False)


@kopf.timer(*RESOURCE, interval=TIMER_SECONDS, initial_delay=TIMER_SECONDS)
def refresh(
    body: kopf.Body, status: kopf.Status, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Keep children in shape (a deleted StatefulSet comes back), balance load, refresh status."""
    _run("refresh", Call.of(body, memo, logger), dict(status), control=True)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(name: str, namespace: str, **_: Any) -> None:
    """Children go by owner references; only the operator's own metric series need dropping."""
    metrics.forget(namespace, name)
