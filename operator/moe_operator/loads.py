"""Reading per-expert token counters: from each worker's /metrics (Direct) or from Prometheus.

A read returns a `CounterSnapshot` (rank -> (layer, expert) -> tokens, monotonically increasing
counters; and rank -> layer -> top-K assignments the gate bias rerouted) or raises
`LoadReadError` with a reason fit for a status condition. Anything odd — a missing pod, a
timeout, a body that is too large, malformed or hostile exposition text, a label out of range, a
negative or non-finite value — is an error, never a partial snapshot: deciding a rebalance on
partial data is worse than skipping one evaluation. Rerouted counters that are absent (workers
of an older image, a Prometheus without them) are no error: the price of a gate bias is then
unknown, and the planner falls back to its growth limit.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TOKENS_METRIC = "moe_expert_tokens_total"
REROUTED_METRIC = "moe_gate_rerouted_total"
PLAN_VERSION_METRIC = "moe_plan_version"
RANK_LABEL = "rank"  # on every worker series (`moe_worker.metrics.RANK_LABEL`)
MAX_BODY_BYTES = 4 * 1024 * 1024
Counters = dict[tuple[int, int], float]  # (layer, logical expert) -> tokens
Rerouted = dict[int, float]  # layer -> top-K assignments the gate bias moved off the model's choice
PROMETHEUS_FAILED = (
    "prometheus: no usable answer from metrics.prometheusUrl (the operator's log says why)"
)
logger = logging.getLogger(__name__)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A user-supplied URL must not lead the operator anywhere else."""

    def redirect_request(self, *_: object, **__: object) -> None:
        return None


_PROMETHEUS_OPENER = urllib.request.build_opener(_NoRedirects())
_DIRECT_OPENER = urllib.request.build_opener()


class LoadReadError(RuntimeError):
    """Why this evaluation must be skipped."""


@dataclass(frozen=True)
class CounterSnapshot:
    """Cumulative counters of every rank, read at one moment."""

    counters: Mapping[int, Counters]  # rank -> counters
    plan_versions: Mapping[int, int]  # rank -> plan version it serves (Direct only)
    rerouted: Mapping[int, Rerouted] = field(default_factory=dict)
    """rank -> its moe_gate_rerouted_total per layer; a rank or layer missing: not measured."""


@dataclass(frozen=True)
class Target:
    """One worker to scrape."""

    rank: int  # the pod's first rank
    url: str  # http://<pod ip>:<port>/metrics
    ranks: int = 1  # the pod's ranks: rank .. rank + ranks - 1, told apart by the `rank` label


def _label_int(labels: Mapping[str, str], key: str, limit: int, where: str) -> int:
    raw = labels.get(key, "")
    if not raw.isdigit() or int(raw) >= limit:
        raise LoadReadError(f"{where}: label {key}={raw[:20]!r} is not in 0..{limit - 1}")
    return int(raw)


def parse_exposition(
    text: str, *, num_layers: int, num_experts: int, where: str, rank: int | None = None
) -> tuple[Counters, int | None]:
    """Counters and plan version from Prometheus text exposition; strict about every sample.
    `rank`: only the samples of that rank (a pod of several labels each series with its
    `rank`); samples without the label count too (a worker of one rank per pod before it)."""
    counters: Counters = {}
    plan_version: int | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as error:  # the parser raises several types on garbage
        raise LoadReadError(f"{where}: malformed metrics text ({type(error).__name__})") from None
    for family in families:
        for sample in family.samples:
            if rank is not None and sample.labels.get(RANK_LABEL, str(rank)) != str(rank):
                continue
            if sample.name == PLAN_VERSION_METRIC:
                plan_version = int(sample.value) if math.isfinite(sample.value) else None
            if sample.name != TOKENS_METRIC:
                continue
            if not math.isfinite(sample.value) or sample.value < 0:
                raise LoadReadError(f"{where}: {TOKENS_METRIC} has value {sample.value}")
            key = (
                _label_int(sample.labels, "layer", num_layers, where),
                _label_int(sample.labels, "expert", num_experts, where),
            )
            counters[key] = counters.get(key, 0.0) + sample.value
    return counters, plan_version


def parse_rerouted(text: str, *, num_layers: int, where: str, rank: int | None = None) -> Rerouted:
    """`moe_gate_rerouted_total` per layer from exposition text already checked by
    `parse_exposition`; strict about every sample it reads; `rank` as there."""
    rerouted: Rerouted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if rank is not None and sample.labels.get(RANK_LABEL, str(rank)) != str(rank):
                continue
            if sample.name != REROUTED_METRIC:
                continue
            if not math.isfinite(sample.value) or sample.value < 0:
                raise LoadReadError(f"{where}: {REROUTED_METRIC} has value {sample.value}")
            layer = _label_int(sample.labels, "layer", num_layers, where)
            rerouted[layer] = rerouted.get(layer, 0.0) + sample.value
    return rerouted


def _fetch(url: str, timeout: float, opener: urllib.request.OpenerDirector | None = None) -> str:
    try:
        with (opener or _DIRECT_OPENER).open(url, timeout=timeout) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except Exception as error:
        raise LoadReadError(f"{url}: {type(error).__name__}: {str(error)[:120]}") from None
    if len(body) > MAX_BODY_BYTES:
        raise LoadReadError(f"{url}: response larger than {MAX_BODY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise LoadReadError(f"{url}: response is not UTF-8 text") from None


def read_direct(
    targets: Iterable[Target],
    *,
    world_size: int,
    num_layers: int,
    num_experts: int,
    timeout: float = 3.0,
) -> CounterSnapshot:
    """Scrape every pod's /metrics in parallel; all ranks or nothing."""
    targets = sorted(targets, key=lambda target: target.rank)
    ranks = [target.rank + local for target in targets for local in range(target.ranks)]
    if sorted(set(ranks)) != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise LoadReadError(
            f"ranks {missing} have no pod address yet"
            if missing
            else f"duplicate ranks among pods: {ranks}"
        )
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        bodies = list(pool.map(lambda target: _fetch(target.url, timeout), targets))
    counters: dict[int, Counters] = {}
    versions: dict[int, int] = {}
    rerouted: dict[int, Rerouted] = {}
    for target, body in zip(targets, bodies, strict=True):
        for rank in range(target.rank, target.rank + target.ranks):
            where = f"rank {rank}"
            parsed, version = parse_exposition(
                body, num_layers=num_layers, num_experts=num_experts, where=where, rank=rank
            )
            counters[rank] = parsed
            rerouted[rank] = parse_rerouted(body, num_layers=num_layers, where=where, rank=rank)
            if version is not None:
                versions[rank] = version
    return CounterSnapshot(counters=counters, plan_versions=versions, rerouted=rerouted)


def prometheus_query(namespace: str, name: str) -> str:
    """PromQL for the per-rank counters of one deployment (the pod label from the PodMonitor,
    the rank label from the worker: a pod of several ranks exposes them all)."""
    return (
        f'sum by ({RANK_LABEL}, layer, expert) ({TOKENS_METRIC}{{namespace="{namespace}",'
        f'pod=~"{name}-[0-9]+"}})'
    )


def prometheus_rerouted_query(namespace: str, name: str) -> str:
    """PromQL for the per-rank rerouted counters of one deployment."""
    return (
        f'sum by ({RANK_LABEL}, layer) ({REROUTED_METRIC}{{namespace="{namespace}",'
        f'pod=~"{name}-[0-9]+"}})'
    )


def _query(base_url: str, promql: str, timeout: float) -> list[object] | None:
    """The result list of an instant query, or None (logged) for any failure."""
    query = urllib.parse.urlencode({"query": promql})
    try:
        body = _fetch(f"{base_url.rstrip('/')}/api/v1/query?{query}", timeout, _PROMETHEUS_OPENER)
        document = json.loads(body)
        results = document["data"]["result"] if document.get("status") == "success" else None
    except (LoadReadError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("Prometheus query %s failed: %s", promql, error)
        results = None
    return results if isinstance(results, list) else None


def _series(item: object, world_size: int) -> tuple[int, dict[str, str], float]:
    """(rank, labels, value) of one series of an answer (the rank from the workers' `rank`
    label: a pod of several ranks exposes them all); LoadReadError if it is not one."""
    try:
        labels, value = dict(item["metric"]), float(item["value"][1])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError):
        raise LoadReadError("prometheus: malformed series in the answer") from None
    rank = _label_int(labels, RANK_LABEL, world_size, "prometheus")
    if not math.isfinite(value) or value < 0:
        raise LoadReadError(f"prometheus: rank {rank} has value {value}")
    return rank, labels, value


def read_prometheus(
    base_url: str,
    namespace: str,
    name: str,
    *,
    world_size: int,
    num_layers: int,
    num_experts: int,
    timeout: float = 5.0,
) -> CounterSnapshot:
    """Instant query of the same counters through Prometheus' HTTP API.

    The URL is the user's: every failure to get a Prometheus answer (refused, timed out, an
    HTTP error, a redirect, something else answering) reads the same in status, so the spec
    cannot be used to probe what listens where; the operator's log has the detail.
    """
    results = _query(base_url, prometheus_query(namespace, name), timeout)
    if results is None:
        raise LoadReadError(PROMETHEUS_FAILED)
    counters: dict[int, Counters] = {}
    for item in results:
        rank, labels, value = _series(item, world_size)
        key = (
            _label_int(labels, "layer", num_layers, "prometheus"),
            _label_int(labels, "expert", num_experts, "prometheus"),
        )
        counters.setdefault(rank, {})[key] = value
    missing = sorted(set(range(world_size)) - set(counters))
    if missing:
        raise LoadReadError(f"prometheus: no series for ranks {missing} yet")
    # The price of a gate bias: unknown (not an error) when Prometheus has none of it.
    rerouted: dict[int, Rerouted] = {}
    for item in _query(base_url, prometheus_rerouted_query(namespace, name), timeout) or ():
        rank, labels, value = _series(item, world_size)
        rerouted.setdefault(rank, {})[_label_int(labels, "layer", num_layers, "prometheus")] = value
    return CounterSnapshot(counters=counters, plan_versions={}, rerouted=rerouted)
