"""Reading per-expert token counters: from each worker's /metrics (Direct) or from Prometheus.

A read returns a `CounterSnapshot` (rank -> (layer, expert) -> tokens, monotonically increasing
counters; and rank -> layer -> top-K assignments the gate bias rerouted) or raises
`LoadReadError` with a reason fit for a status condition. Anything odd — a missing pod, a
timeout, a body that is too large, malformed or hostile exposition text, a label out of range, a
negative or non-finite value — is an error, never a partial snapshot: deciding a rebalance on
partial data is worse than skipping one evaluation. Rerouted counters that are absent (workers
of an older image, a Prometheus without them) are no error: the price of a gate bias is then
unknown, and the planner falls back to its growth limit.

At scale (256 ranks): pods are read `READ_CONCURRENCY` at a time, each within `timeout`
seconds all told (a pod that trickles its body is cut off, not waited for), and the whole read
within `deadline`: a slow rank costs one skipped evaluation, never a stalled control step. Each
body is parsed once, for all of its pod's ranks (`exposition`), in the thread that fetched it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_operator.exposition import (
    PLAN_VERSION_METRIC,
    RANK_LABEL,
    REROUTED_METRIC,
    TOKENS_METRIC,
    ExpositionError,
    RankReading,
    parse_ranks,
)

__all__ = ["PLAN_VERSION_METRIC", "REROUTED_METRIC", "TOKENS_METRIC"]

MAX_BODY_BYTES = 4 * 1024 * 1024
READ_CONCURRENCY = 32
"""Pods read at once: enough to read 256 ranks in a few round trips, few enough threads."""
CHUNK_BYTES = 64 * 1024
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


def _reading(text: str, ranks: range, *, where: str, **options: Any) -> dict[int, RankReading]:
    try:
        return parse_ranks(text, ranks, where=where, **options)
    except ExpositionError as error:
        raise LoadReadError(str(error)) from None


def parse_exposition(
    text: str, *, num_layers: int, num_experts: int, where: str, rank: int | None = None
) -> tuple[Counters, int | None]:
    """Counters and plan version from Prometheus text exposition; strict about every sample.
    `rank`: only the samples of that rank (a pod of several labels each series with its
    `rank`); samples without the label count too (a worker of one rank per pod before it)."""
    mine = 0 if rank is None else rank
    reading = _reading(
        text,
        range(mine, mine + 1),
        num_layers=num_layers,
        num_experts=num_experts,
        where=where,
        any_rank=rank is None,
    )[mine]
    return reading.counters, reading.plan_version


def parse_rerouted(text: str, *, num_layers: int, where: str, rank: int | None = None) -> Rerouted:
    """`moe_gate_rerouted_total` per layer from exposition text; strict about every sample it
    reads; `rank` as for `parse_exposition`."""
    mine = 0 if rank is None else rank
    reading = _reading(
        text,
        range(mine, mine + 1),
        num_layers=num_layers,
        num_experts=0,
        where=where,
        any_rank=rank is None,
        metrics=(REROUTED_METRIC,),
    )
    return reading[mine].rerouted


def fetch_text(
    url: str, timeout: float, opener: urllib.request.OpenerDirector | None = None
) -> str:
    """The body at `url`, within `timeout` seconds all told (not per socket operation)."""
    started = time.monotonic()
    chunks: list[bytes] = []
    size = 0
    try:
        with (opener or _DIRECT_OPENER).open(url, timeout=timeout) as response:
            while size <= MAX_BODY_BYTES:
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"body not read within {timeout:g} s")
                chunk = response.read1(CHUNK_BYTES)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except Exception as error:
        raise LoadReadError(f"{url}: {type(error).__name__}: {str(error)[:120]}") from None
    if size > MAX_BODY_BYTES:
        raise LoadReadError(f"{url}: response larger than {MAX_BODY_BYTES} bytes")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise LoadReadError(f"{url}: response is not UTF-8 text") from None


def _read_pod(
    target: Target, timeout: float, num_layers: int, num_experts: int
) -> dict[int, RankReading]:
    ranks = range(target.rank, target.rank + target.ranks)
    where = f"rank {target.rank}" if target.ranks == 1 else f"ranks {ranks.start}..{ranks.stop - 1}"
    try:
        body = fetch_text(target.url, timeout)
    except LoadReadError as error:
        raise LoadReadError(f"{where}: {error}") from None
    return _reading(body, ranks, num_layers=num_layers, num_experts=num_experts, where=where)


def read_direct(
    targets: Iterable[Target],
    *,
    world_size: int,
    num_layers: int,
    num_experts: int,
    timeout: float = 3.0,
    deadline: float | None = None,
    concurrency: int = READ_CONCURRENCY,
) -> CounterSnapshot:
    """Scrape every pod's /metrics, `concurrency` at a time; all ranks or nothing.

    Args:
        timeout: seconds one pod may take, connection and whole body.
        deadline: seconds the whole read may take (default: two rounds of `timeout`); pods not
            read by then fail the read, and their threads end within their own timeout.
    """
    targets = sorted(targets, key=lambda target: target.rank)
    ranks = [target.rank + local for target in targets for local in range(target.ranks)]
    if sorted(set(ranks)) != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise LoadReadError(
            f"ranks {missing} have no pod address yet"
            if missing
            else f"duplicate ranks among pods: {ranks}"
        )
    limit = 2 * timeout if deadline is None else deadline
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets))))
    try:
        futures = {
            pool.submit(_read_pod, target, timeout, num_layers, num_experts): target
            for target in targets
        }
        done, late = concurrent.futures.wait(futures, timeout=limit)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if late:
        slow = sorted(futures[future].rank for future in late)
        raise LoadReadError(
            f"pods of ranks {slow[:8]}{' ...' if len(slow) > 8 else ''} not read within "
            f"{limit:g} s (timed out)"
        )
    counters: dict[int, Counters] = {}
    versions: dict[int, int] = {}
    rerouted: dict[int, Rerouted] = {}
    for future in sorted(done, key=lambda future: futures[future].rank):
        for rank, reading in future.result().items():  # raises the pod's LoadReadError
            counters[rank], rerouted[rank] = reading.counters, reading.rerouted
            if reading.plan_version is not None:
                versions[rank] = reading.plan_version
    return CounterSnapshot(counters=counters, plan_versions=versions, rerouted=rerouted)


def layer_tokens(
    previous: CounterSnapshot, current: CounterSnapshot, num_layers: int
) -> dict[int, list[float]]:
    """rank -> [L] tokens it processed in each layer over the window (one pass; keys outside
    the L layers are left to `detection.counter_deltas` to refuse)."""
    tokens: dict[int, list[float]] = {}
    for rank, counters in current.counters.items():
        old = previous.counters.get(rank, {})
        per_layer = [0.0] * num_layers
        for key, value in counters.items():
            if 0 <= key[0] < num_layers:
                per_layer[key[0]] += value - old.get(key, 0.0)
        tokens[rank] = per_layer
    return tokens


def prometheus_query(namespace: str, name: str) -> str:
    """PromQL for the per-rank counters of one deployment (the pod label from the PodMonitor,
    the rank label from the worker: a pod of several ranks exposes them all), summed over its
    replica groups (pods `<name>-<ordinal>` and `<name>-g<k>-<ordinal>`)."""
    return (
        f'sum by ({RANK_LABEL}, layer, expert) ({TOKENS_METRIC}{{namespace="{namespace}",'
        f'pod=~"{name}(-g[0-9]+)?-[0-9]+"}})'
    )


def prometheus_rerouted_query(namespace: str, name: str) -> str:
    """PromQL for the per-rank rerouted counters of one deployment."""
    return (
        f'sum by ({RANK_LABEL}, layer) ({REROUTED_METRIC}{{namespace="{namespace}",'
        f'pod=~"{name}(-g[0-9]+)?-[0-9]+"}})'
    )


def _query(base_url: str, promql: str, timeout: float) -> list[object] | None:
    """The result list of an instant query, or None (logged) for any failure."""
    query = urllib.parse.urlencode({"query": promql})
    try:
        body = fetch_text(
            f"{base_url.rstrip('/')}/api/v1/query?{query}", timeout, _PROMETHEUS_OPENER
        )
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
