"""The operator's own Prometheus metrics (served on --metrics-port).

Names and labels are part of the alerting contract in manifests/prometheus/: change them together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from prometheus_client import Counter, Gauge, Histogram

_DEPLOYMENT = ("namespace", "moedeployment")

layer_imbalance = Gauge(
    "moe_layer_imbalance_ratio",
    "Max rank load / mean rank load per layer in the last window.",
    (*_DEPLOYMENT, "layer"),
)
gate_rerouted_fraction = Gauge(
    "moe_gate_rerouted_fraction",
    "Per layer, the fraction of top-K assignments the gate bias sent to another expert than the "
    "model's own choice in the last window (workers' moe_gate_rerouted_total).",
    (*_DEPLOYMENT, "layer"),
)
imbalance_threshold = Gauge(
    "moe_imbalance_threshold", "The deployment's spec.rebalancing.imbalanceThreshold.", _DEPLOYMENT
)
rebalances = Counter(
    "moe_rebalances_total",
    "Plans handed to the workers by the rebalancer.",
    (*_DEPLOYMENT, "method"),
)
plan_desired_version = Gauge(
    "moe_plan_desired_version", "Version of the plan in the plan ConfigMap.", _DEPLOYMENT
)
plan_applied_version = Gauge(
    "moe_plan_applied_version", "Plan version the workers report serving.", _DEPLOYMENT
)
workers_ready = Gauge("moe_workers_ready", "Worker pods ready.", _DEPLOYMENT)
workers_desired = Gauge("moe_workers_desired", "Worker pods wanted (world size).", _DEPLOYMENT)
reconcile_seconds = Histogram(
    "moe_operator_reconcile_seconds", "Duration of one handler run.", ("handler",)
)
reconcile_errors = Counter(
    "moe_operator_reconcile_errors_total",
    "Handler runs that failed (logged, reported in an Event and the Reconciled condition).",
    ("handler",),
)
evaluations_skipped = Counter(
    "moe_load_evaluations_skipped_total",
    "Load evaluations skipped: counters unreadable (reason unreadable) or inconsistent (unusable).",
    (*_DEPLOYMENT, "reason"),
)


@contextlib.contextmanager
def reconcile_timer(handler: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        reconcile_seconds.labels(handler).observe(time.perf_counter() - started)


def observe_workers(namespace: str, name: str, ready: int, desired: int) -> None:
    workers_ready.labels(namespace, name).set(ready)
    workers_desired.labels(namespace, name).set(desired)


def observe_plan(namespace: str, name: str, desired: int, applied: int) -> None:
    plan_desired_version.labels(namespace, name).set(desired)
    plan_applied_version.labels(namespace, name).set(applied)


def observe_imbalance(
    namespace: str, name: str, per_layer: Sequence[float], threshold: float
) -> None:
    imbalance_threshold.labels(namespace, name).set(threshold)
    for layer, ratio in enumerate(per_layer):
        layer_imbalance.labels(namespace, name, str(layer)).set(ratio)


def observe_rerouted(namespace: str, name: str, per_layer: Sequence[float | None]) -> None:
    for layer, fraction in enumerate(per_layer):
        if fraction is not None:
            gate_rerouted_fraction.labels(namespace, name, str(layer)).set(fraction)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted deployment's series so alerts do not fire on ghosts."""
    for gauge in (
        imbalance_threshold,
        plan_desired_version,
        plan_applied_version,
        workers_ready,
        workers_desired,
    ):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for metric in (layer_imbalance, gate_rerouted_fraction, rebalances, evaluations_skipped):
        for labels in list(metric._metrics):  # no public API to list label sets
            if labels[:2] == (namespace, name):
                with contextlib.suppress(KeyError):  # a concurrent forget got there first
                    metric.remove(*labels)
