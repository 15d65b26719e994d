"""A strict, fast reader of the workers' Prometheus text exposition (the three series we use).

Every sample line must be well formed (name, labels, value, optional timestamp: the text format
0.0.4); comments and blank lines are skipped; anything else is an error, never skipped data. Of
the samples only `moe_expert_tokens_total{rank,layer,expert}`, `moe_gate_rerouted_total{rank,
layer}` and `moe_plan_version{rank}` are kept, each checked (labels in range, values finite and
non-negative). One pass over a pod's body gives every rank's readings: a pod of 8 ranks at
DeepSeek scale exposes a few thousand samples, and prometheus_client's parser (about 17 us a
sample) read each body once per rank before.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

TOKENS_METRIC = "moe_expert_tokens_total"
REROUTED_METRIC = "moe_gate_rerouted_total"
PLAN_VERSION_METRIC = "moe_plan_version"
RANK_LABEL = "rank"  # on every worker series (`moe_worker.metrics.RANK_LABEL`)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_VALUE = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[Nn]a[Nn]|[Ii]nf)"
_SAMPLE = re.compile(
    rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*,?)?\}})?[ \t]+({_VALUE})(?:[ \t]+-?\d+)?[ \t]*"
)
_LABELS = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
WANTED = (TOKENS_METRIC, REROUTED_METRIC, PLAN_VERSION_METRIC)


class ExpositionError(ValueError):
    """Text that is not a well-formed exposition of sane counters; the message says where."""


@dataclass
class RankReading:
    """One rank's samples of the series we use."""

    counters: dict[tuple[int, int], float] = field(default_factory=dict)
    """(layer, logical expert) -> tokens (a duplicated series adds up)."""
    rerouted: dict[int, float] = field(default_factory=dict)
    """layer -> top-K assignments the gate bias rerouted."""
    plan_version: int | None = None


def _label_int(labels: dict[str, str], key: str, limit: int, where: str) -> int:
    raw = labels.get(key, "")
    if not raw.isdigit() or int(raw) >= limit:
        raise ExpositionError(f"{where}: label {key}={raw[:20]!r} is not in 0..{limit - 1}")
    return int(raw)


def parse_ranks(
    text: str,
    ranks: range,
    *,
    num_layers: int,
    num_experts: int,
    where: str,
    any_rank: bool = False,
    metrics: tuple[str, ...] = WANTED,
) -> dict[int, RankReading]:
    """Readings of each rank in `ranks` from one body (of the series in `metrics`).

    A sample labelled with a rank outside `ranks` is not ours and is left out; one without a
    `rank` label counts for every rank of `ranks` (a worker of one rank per pod before the
    label). `any_rank`: every sample counts for every rank of `ranks`, whatever its label.
    """
    readings = {rank: RankReading() for rank in ranks}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line or line[0] == "#" or line.isspace():
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            raise ExpositionError(f"{where}: malformed metrics text (line {number})")
        name = match.group(1)
        if name not in metrics:
            continue
        labels = dict(_LABELS.findall(match.group(2) or ""))
        value = float(match.group(3))
        label = None if any_rank else labels.get(RANK_LABEL)
        targets = list(ranks) if label is None else [int(label)] if label.isdigit() else []
        targets = [rank for rank in targets if rank in readings]
        if not targets:
            continue
        _take(name, labels, value, [readings[r] for r in targets], num_layers, num_experts, where)
    return readings


def _take(
    name: str,
    labels: dict[str, str],
    value: float,
    readings: list[RankReading],
    num_layers: int,
    num_experts: int,
    where: str,
) -> None:
    if name == PLAN_VERSION_METRIC:
        version = int(value) if math.isfinite(value) else None
        for reading in readings:
            reading.plan_version = version
        return
    if not math.isfinite(value) or value < 0:
        raise ExpositionError(f"{where}: {name} has value {value}")
    layer = _label_int(labels, "layer", num_layers, where)
    if name == REROUTED_METRIC:
        for reading in readings:
            reading.rerouted[layer] = reading.rerouted.get(layer, 0.0) + value
        return
    key = (layer, _label_int(labels, "expert", num_experts, where))
    for reading in readings:
        reading.counters[key] = reading.counters.get(key, 0.0) + value
