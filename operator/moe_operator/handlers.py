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
from moe_contract.group import GroupStatus
from moe_contract.plan import Plan
from moe_operator import api, handoff, metrics
from moe_operator.failures import StartupFailure
from moe_operator.fleet import (
    Fleet,
    GroupRead,
    apply_rollout,
    ensure_groups,
    label_pods,
    plan_rollout,
)
from moe_operator.fleet import read_fleet as fleet_of
from moe_operator.groups import naming, report
from moe_operator.groups.read import ready_replicas
from moe_operator.groups.rollout import Rollout
from moe_operator.images import WorkerImages, with_worker_image
from moe_operator.kube import Cluster, Conflict, load_client_config, secret_value
from moe_operator.manifests import children
from moe_operator.planning.detection import DetectionState
from moe_operator.planning.ledger import Ledger
from moe_operator.planning.record import PlanShape
from moe_operator.rankloss import (
    membership_of,
    transition_events,
)
from moe_operator.rebalance import PlanStoreConflict, StepOutcome, Window, control_step
from moe_operator.reconcile import (
    ChildrenState,
    Owner,
    delete_pods,
    ensure_children,
    hold_group,
    record_notes,
    write_plan,
)
from moe_operator.recovery import GroupView, decide
from moe_operator.status import (
    Observed,
    compute_status,
    plan_redundancy,
    plan_status,
    read_rebalance_record,
    reconcile_error_status,
)
from moe_operator.validation import parse_spec
from moe_operator.workers import GroupsWorkers, PodWorkers

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

    @property
    def owner(self) -> Owner:
        """The owner of the children (kopf.adopt sets their controller reference)."""
        adopt = functools.partial(kopf.adopt, owner=self.body)
        return Owner(self.name, self.namespace, self.uid, adopt)

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
        conditions = base.get("conditions") or []
        _write(call, reconcile_error_status(conditions, message, call.generation, _now()))
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
    """Parse, ensure the shared children, roll the groups out, decide about each group and
    apply it, balance, write status."""
    parsed, problems = parse_spec(call.spec, name=call.name)
    if parsed is None:
        _write_invalid(call, base, [str(problem) for problem in problems])
        return
    parsed = with_worker_image(parsed, call.memo.worker_images)
    known = Ledger.from_status(base)  # a lost plan record never goes back past it
    now = time.time()
    fleet = fleet_of(call.cluster, call.owner, parsed)
    # Labels first: an upgraded operator's first run moves `<name>-api` from pod 0 by name to
    # the leaders' labels, which must be there by then.
    label_pods(call.cluster, call.namespace, fleet)
    state = _ensure(call, parsed, known, fleet)
    if state.conflicts:
        _write_conflicts(call, base, parsed, state)
        return
    assert state.plan is not None
    held = StartupFailure.held(base.get("refusal"), call.generation) is not None
    rollout = plan_rollout(fleet, parsed, now)
    call.announce(apply_rollout(call.cluster, call.owner, parsed, fleet, rollout, now, hold=held))
    changes = ensure_groups(call.cluster, call.owner, parsed, fleet, hold=held)
    call.announce([("Normal", "Reconciled", change) for change in changes])
    runs = [_decide_group(call, parsed, state, group, base, now) for group in fleet.groups]
    for run in runs:  # refused just now: no restart by the kubelet, nor by us
        if run.action.hold and not (held and run.read.current):
            hold_group(call.cluster, call.namespace, run.read.statefulset)
    standing = _standing(base, known, state)
    serving = [run for run in runs if run.takes_plans(parsed.pods)]
    if control and serving:
        standing = _balance(call, parsed, state, standing, serving)
    _write_status(call, base, parsed, runs, rollout, standing)


def _decide_group(
    call: Call,
    spec: api.MoEDeploymentSpec,
    state: ChildrenState,
    group: GroupRead,
    base: dict[str, Any],
    now: float,
) -> report.GroupRun:
    """A group's own recovery (a dead rank, pods of an older template after a restart in
    place, a refusal to start), read from its own leader's membership and applied at once;
    its own rank-loss passage Events."""
    previous = report.group_previous(base, group.index, current=group.current)
    membership, answered = _membership(call, spec, group.pods, previous)
    view = GroupView(
        group.statefulset, group.pods, spec.pods, group.ready, previous, call.generation,
        membership=membership,
        plan=state.plan, ranks_per_pod=spec.worker.local_ranks(),
        max_slots=spec.placement.most_slots_per_rank,
    )  # fmt: skip
    action = decide(view, now)
    deleted = delete_pods(call.cluster, call.namespace, action.delete)
    group_state, events = action.after_deleting(deleted)
    call.announce(list(events))
    # GroupWhole only on the leader's word: a recorded membership may be that of a group
    # whose leader just stopped.
    whole = membership if answered and not action.replacing else None
    named = [
        (kind, reason, report.named_index(group, message))
        for kind, reason, message in transition_events(previous, action.rank_loss, whole)
    ]
    call.announce(named)
    return report.GroupRun(group, view, action, group_state)


def _ensure(call: Call, spec: api.MoEDeploymentSpec, known: Ledger, fleet: Fleet) -> ChildrenState:
    """Create or repair the shared children, the plan record included; announce changes."""
    leaders = [group.pods for group in fleet.groups if group.pods]
    state = ensure_children(
        call.cluster,
        call.owner,
        spec,
        known,
        leader=lambda: _workers(call, spec, leaders[0]).served_plan() if leaders else None,
        pods=fleet.pods,
        router_image=call.memo.worker_images.router,
    )
    if not state.conflicts:
        call.announce([("Normal", "Reconciled", change) for change in state.changes])
        call.announce(list(state.events))
    return state


def _membership(
    call: Call, spec: api.MoEDeploymentSpec, pods: list[dict[str, Any]], base: dict[str, Any]
) -> tuple[GroupStatus | None, bool]:
    """The leader's membership and True; when it does not answer, the one status recorded (a
    group that ran its own membership still does) and False."""
    try:
        return _workers(call, spec, pods).group(), True
    except handoff.HandoffError:
        return membership_of(base), False


def _workers(call: Call, spec: api.MoEDeploymentSpec, pods: list[dict[str, Any]]) -> PodWorkers:
    return PodWorkers(pods, spec, call.namespace, call.name, functools.partial(_token, call))


@dataclass(frozen=True)
class Standing:
    """Where the plan stands: the record's plan, its versions, what detection remembers."""

    desired: Plan
    ledger: Ledger
    detection: DetectionState
    last_rebalance: api.RebalanceRecord | None
    outcome: StepOutcome | None = None  # this run's control step, if one ran


def _standing(base: dict[str, Any], known: Ledger, state: ChildrenState) -> Standing:
    """The plan as the record holds it, with detection state and last rebalance from status;
    when status lost the newest plan (the operator died between writing it and patching
    status), those come from the ConfigMap's annotations."""
    assert state.plan is not None
    detection_state = DetectionState.from_dict(base.get("detection"))
    last_rebalance = read_rebalance_record(base.get("lastRebalance"))
    notes = record_notes(state.configmap)
    record = read_rebalance_record(notes.last_rebalance)
    lost = known.lost_in_status(state.plan.version, notes.version)
    if lost and record is not None and record.to_version == state.plan.version:
        last_rebalance = record
        if notes.issued_at is not None:
            detection_state = dataclasses.replace(
                detection_state, last_rebalance_at=notes.issued_at
            )
    return Standing(state.plan, known.recorded(state.plan), detection_state, last_rebalance)


def _balance(
    call: Call,
    spec: api.MoEDeploymentSpec,
    state: ChildrenState,
    standing: Standing,
    serving: list[report.GroupRun],
) -> Standing:
    """One control step (the timer's) over the groups that take plans: their counts summed,
    the plan handed to one group after another."""
    members = tuple((run.read.index, run.read.statefulset["metadata"]["uid"]) for run in serving)
    if "window" not in call.memo or call.memo.get("members") != members:
        # Counters of another set of groups do not continue the last window's sum.
        last = call.memo.get("window")
        call.memo.window = Window(started_at=time.time())
        if last is not None:
            call.memo.window.last_layer_imbalance = last.last_layer_imbalance
        call.memo.members = members
    store = ConfigMapStore(call.cluster, call.owner, children.plan_shape(spec), state.configmap)
    workers = GroupsWorkers([_workers(call, spec, run.read.pods) for run in serving])
    outcome = control_step(
        spec, standing.desired, standing.ledger, standing.detection, call.memo.window,
        workers, store, time.time(), standing.last_rebalance,
    )  # fmt: skip
    served = call.memo.setdefault("served", {})
    served.update(zip((run.read.index for run in serving), workers.served_versions(), strict=True))
    call.announce(outcome.events)
    return Standing(
        outcome.desired,
        outcome.ledger,
        outcome.state,
        outcome.rebalance or standing.last_rebalance,
        outcome,
    )


def _token(call: Call) -> str | None:
    """The control token, from the deployment's own Secret only."""
    secret = call.cluster.get("Secret", call.namespace, children.token_secret_name(call.name))
    if not children.controlled_by(secret, call.uid):
        return None
    return secret_value(secret, worker_env.TOKEN_FILE_NAME)


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
    spec: api.MoEDeploymentSpec,
    runs: list[report.GroupRun],
    rollout: Rollout,
    standing: Standing,
) -> None:
    """Status fields and the operator's metrics, from one set of observations."""
    window: Window | None = call.memo.get("window")
    per_layer = window.last_layer_imbalance if window else ()
    window_problem = window.last_loads_problem if window else None
    rerouted = window.last_rerouted_fraction if window else ()
    outcome, desired, ledger = standing.outcome, standing.desired, standing.ledger
    where = children.plan_configmap_name(call.name), children.plan_shape(spec).key
    groups = report.groups_seen(spec, runs, call.memo.get("served") or {})
    loss = next((run for run in runs if run.action.rank_loss is not None), None)
    world = spec.pods * spec.replicas  # pods, not ranks: what the StatefulSets count ready
    active = [run for run in runs if run.read.drain is None]
    ready = min(world, sum(min(run.read.ready, spec.pods) for run in active))
    serving = sum(1 for run in active if run.read.serving(spec.pods))
    restarting = [run for run in runs if run.action.restarting or report.forming(run, spec.pods)]
    recovering = next((run for run in runs if run.action.recovering), None)
    failure = next((run.action.failure for run in runs if run.action.failure), None)
    short = serving < spec.replicas  # a rollout that keeps every group serving is no restart
    busy = short and (restarting or rollout.busy)
    restart = report.rollout_message(rollout, restarting, spec.pods) if busy else None
    observed = Observed(
        generation=call.generation,
        workers=world,
        statefulset_exists=bool(runs),
        ready_workers=ready,
        rollout_in_progress=bool(restarting) or rollout.busy or not runs,
        plan=plan_status(ledger, desired.method, *where),
        worst_imbalance=max(per_layer) if per_layer else None,
        rerouted_fraction=rerouted,
        max_rerouted_fraction=spec.rebalancing.gating.max_rerouted_fraction,
        gate_bias_active=desired.gate_bias is not None,
        imbalance_threshold=spec.rebalancing.imbalance_threshold,
        loads_problem=report.loads_problem(window_problem, runs, spec),
        handoff_problem=outcome.handoff_problem if outcome else None,
        was_running=_was_running(base),
        balance_note=report.balance_note(desired),
        group_restart=restart,
        recovering=report.named(recovering, recovering.action.recovering) if recovering else None,
        startup_failure=failure,
        endpoint=children.api_endpoint(call.name, call.namespace, spec),
        served_model_name=children.served_model_name(call.name, spec),
        detection=standing.detection,
        last_rebalance=standing.last_rebalance,
        recovery=report.last_replaced(runs),
        replicas=len(runs),
        ready_replicas=serving,
        label_selector=naming.leaders_selector(call.name),
        groups=groups,
        refusal=report.refusal(runs, call.generation),
        rank_loss=report.named_loss(loss),
        membership=report.membership_shown(runs, loss),
        redundancy=plan_redundancy(desired, spec.worker.local_ranks()),
    )  # fmt: skip
    _write(call, compute_status(observed, base.get("conditions") or [], _now()))
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
