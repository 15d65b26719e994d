"""The plan: the one contract between the operator and the workers.

A plan says, for every layer, which logical expert each physical slot holds, and optionally a
per-layer gate bias used for top-K selection only. It is immutable and versioned: a worker ignores
a plan whose version is not newer than the one it serves. The operator imports this module, so it
must never import torch.

Legend for shapes: L = layers, R = ranks (world size), S = slots per rank, E = logical experts.

    slots[l][r][k]   logical expert held by slot k of rank r in layer l          [L][R][S]
    gateBias[l][e]   bias added to expert e's gate score for selection only     [L][E]
    gateMaxMargin    the bias acts only on tokens whose K-th and (K+1)-th gate   scalar
                     probabilities are closer than this (`moe_worker.models.routing`)
    ranksPerPod      ranks of one pod; the workers route tokens to replicas in    scalar
                     their own pod where balance allows (`pod_routes`)
    absentRanks      ranks out of the group (lost, or joining): their slots[l][r]  [..]
                     are empty; the survivors serve every expert
                     (`moe_contract.elastic.degraded_plan`)

The JSON document uses camelCase keys (`slotsPerRank`, `gateBias`) like the Kubernetes API.
Where it is stored (the plan ConfigMap) a large plan takes its compact form (`to_stored_json`):
`slots` and `gateBias` as little-endian uint16 / float64 arrays in base64 with their shape,
`{"encoding": "uint16-le-base64", "shape": [L, R, S], "data": "..."}`. It is exact (the same
plan, the same digest) and about a third of the JSON lists at DeepSeek scale; `parse_plan`
reads both forms. The digest and the documents sent over HTTP are always the plain form.
`slotsPerRank` may differ from the deployment's starting value: the operator grows it online, up
to a maximum the deployment allows (`validate_plan(..., max_slots_per_rank=)`), when ranks have
memory to spare.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PLAN_FILE_NAME = "plan.json"
"""File name of the plan where it is mounted in a pod (the operator maps a ConfigMap key to it)."""

MAX_PLAN_VERSION = 2**53 - 1
"""Largest plan version: exact as a JSON number (an IEEE double) and as a Kubernetes int64, so
every reader (the CRD's status, Prometheus gauges, JavaScript clients) sees the same number."""


COMPACT_FROM_BYTES = 256 * 1024
"""A plan whose plain JSON is larger goes into its ConfigMap in the compact form."""
SLOTS_ENCODING = "uint16-le-base64"
BIAS_ENCODING = "float64-le-base64"
_TYPECODES = {SLOTS_ENCODING: "H", BIAS_ENCODING: "d"}


def _flatten(nested: Any, depth: int) -> list[Any]:
    values = list(nested)
    for _ in range(depth - 1):
        values = [item for row in values for item in row]
    return values


def _encode(encoding: str, nested: Any, depth: int) -> dict[str, Any]:
    """`nested` (a regular table `depth` deep) as a compact array."""
    shape, level = [], nested
    for _ in range(depth):
        shape.append(len(level))
        level = level[0] if len(level) else ()
    packed = array.array(_TYPECODES[encoding], _flatten(nested, depth))
    if sys.byteorder == "big":
        packed.byteswap()
    return {"encoding": encoding, "shape": shape, "data": base64.b64encode(packed).decode()}


def _decode(value: dict[str, Any], encoding: str, depth: int) -> Any:
    """The nested lists of a compact array; ValueError says what does not fit."""
    if value.get("encoding") != encoding:
        raise ValueError(f"encoding must be {encoding!r}, got {value.get('encoding')!r}")
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != depth
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
    ):
        raise ValueError(f"shape must be {depth} positive integers, got {shape!r}")
    try:
        raw = base64.b64decode(str(value.get("data", "")), validate=True)
    except ValueError:
        raise ValueError("data is not base64") from None
    packed = array.array(_TYPECODES[encoding])
    if len(raw) != math.prod(shape) * packed.itemsize:
        raise ValueError(
            f"data holds {len(raw)} bytes, shape {shape} needs {math.prod(shape) * packed.itemsize}"
        )
    packed.frombytes(raw)
    if sys.byteorder == "big":
        packed.byteswap()
    nested: list[Any] = packed.tolist()
    for size in reversed(shape[1:]):
        nested = [nested[start : start + size] for start in range(0, len(nested), size)]
    return nested


class PlanError(ValueError):
    """A plan that does not fit the model or the world; the message names the field and the fix."""


class Plan(BaseModel):
    """A versioned placement of logical experts onto physical slots, plus optional gate bias."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    version: int = Field(
        ge=1,
        le=MAX_PLAN_VERSION,
        description="Strictly increasing; older or equal versions are ignored.",
    )
    slots_per_rank: int = Field(
        alias="slotsPerRank", ge=1, description="Expert slots per rank and layer."
    )
    slots: tuple[tuple[tuple[int, ...], ...], ...] = Field(
        description="slots[layer][rank][k]: the logical expert held by slot k of that rank."
    )
    gate_bias: tuple[tuple[float, ...], ...] | None = Field(
        default=None,
        alias="gateBias",
        description="gateBias[layer][expert]: added to gate scores for top-K selection only.",
    )
    gate_max_margin: float | None = Field(
        default=None,
        alias="gateMaxMargin",
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "The bias acts only on tokens whose K-th and (K+1)-th gate probabilities are closer "
            "than this, and only between experts within half of it of that boundary; absent: "
            "on every token."
        ),
    )
    method: str = Field(default="RoundRobin", description="The planner that produced this plan.")
    ranks_per_pod: int | None = Field(
        default=None,
        alias="ranksPerPod",
        ge=1,
        description=(
            "Ranks of one pod (rank r in pod r // ranksPerPod): the workers keep a token in its "
            "pod up to the share of the expert's replicas the pod holds (`pod_routes`); absent: "
            "every expert's tokens spread over all its replicas."
        ),
    )
    absent_ranks: tuple[int, ...] | None = Field(
        default=None,
        alias="absentRanks",
        description=(
            "Ranks out of the group (lost, or not yet rejoined), sorted: they hold no slot (their "
            "slots rows are empty) and every expert is served by the others. Only the workers "
            "serve such a plan (`moe_contract.elastic.degraded_plan`); the operator never issues "
            "one."
        ),
    )

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def world_size(self) -> int:
        return len(self.slots[0]) if self.slots else 0

    @property
    def absent(self) -> frozenset[int]:
        """Ranks holding no slot (out of the group); empty for every plan the operator issues."""
        return frozenset(self.absent_ranks or ())

    @property
    def present(self) -> tuple[int, ...]:
        """Ranks holding slots, in order."""
        absent = self.absent
        return tuple(rank for rank in range(self.world_size) if rank not in absent)

    def replicas(self, layer: int) -> dict[int, list[tuple[int, int]]]:
        """Logical expert -> its (rank, slot) places in `layer`, in rank-then-slot order."""
        places: dict[int, list[tuple[int, int]]] = {}
        for rank, rank_slots in enumerate(self.slots[layer]):
            for slot, expert in enumerate(rank_slots):
                places.setdefault(expert, []).append((rank, slot))
        return places

    def to_document(self) -> dict[str, Any]:
        """The JSON-ready document (camelCase keys, no empty gate bias)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_document(), separators=(",", ":"))

    def to_compact_document(self) -> dict[str, Any]:
        """The document with `slots` and `gateBias` as base64 arrays (see the module)."""
        document = self.to_document()
        document["slots"] = _encode(SLOTS_ENCODING, self.slots, 3)
        if self.gate_bias is not None:
            document["gateBias"] = _encode(BIAS_ENCODING, self.gate_bias, 2)
        return document

    def to_stored_json(self) -> str:
        """What the plan ConfigMap stores: the plain JSON, or the compact form where the plain
        one is over `COMPACT_FROM_BYTES` (only plans that large, which older workers could not
        have been given, ever take it)."""
        plain = self.to_json()
        if len(plain) <= COMPACT_FROM_BYTES:
            return plain
        return json.dumps(self.to_compact_document(), separators=(",", ":"))

    @field_validator("slots", mode="before")
    @classmethod
    def _decoded_slots(cls, value: Any) -> Any:
        return _decode(value, SLOTS_ENCODING, 3) if isinstance(value, dict) else value

    @field_validator("gate_bias", mode="before")
    @classmethod
    def _decoded_bias(cls, value: Any) -> Any:
        return _decode(value, BIAS_ENCODING, 2) if isinstance(value, dict) else value

    def digest(self) -> str:
        """SHA-256 of the canonical document: two plans with one version and different contents
        differ here, so the operator can tell the plan it sent from any other of that version."""
        canonical = json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_version(self, version: int) -> Plan:
        return self.model_copy(update={"version": version})


def parse_plan(document: str | bytes | dict[str, Any]) -> Plan:
    """Parse a plan document; raise PlanError naming the offending field.

    A document may carry its `digest` (as GET /v1/plan answers); it must then match the contents.
    """
    try:
        raw = json.loads(document) if isinstance(document, str | bytes) else dict(document)
    except ValueError as error:
        raise PlanError(f"plan: not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise PlanError("plan: expected a JSON object")
    claimed = raw.pop("digest", None)
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "plan"
        raise PlanError(f"{where}: {first['msg']}") from None
    if claimed is not None and claimed != plan.digest():
        raise PlanError("digest: does not match the plan's contents")
    return plan


def validate_plan(
    plan: Plan,
    *,
    num_layers: int,
    num_experts: int,
    world_size: int,
    max_slots_per_rank: int | None = None,
) -> None:
    """Check that `plan` fits a model of `num_layers` x `num_experts` on `world_size` ranks.

    Raises PlanError with a message naming the field and what would fix it. Every logical expert
    must have at least one slot in every layer, and every rank exactly `slotsPerRank` slots;
    with `max_slots_per_rank`, slotsPerRank may not exceed it (the slots the ranks have memory
    for).
    """
    if max_slots_per_rank is not None and plan.slots_per_rank > max_slots_per_rank:
        raise PlanError(
            f"slotsPerRank: {plan.slots_per_rank} exceeds the {max_slots_per_rank} slots per rank "
            "this deployment allows (placement.maxSlotsPerRank); raise it if memory allows"
        )
    if plan.num_layers != num_layers:
        raise PlanError(f"slots: has {plan.num_layers} layers, the model has {num_layers}")
    if plan.ranks_per_pod is not None and world_size % plan.ranks_per_pod:
        raise PlanError(
            f"ranksPerPod: {plan.ranks_per_pod} does not divide the world size {world_size}; "
            "use the deployment's worker.ranksPerPod"
        )
    absent = plan.absent
    if plan.absent_ranks is not None:
        _validate_absent(plan.absent_ranks, world_size)
    for layer, layer_slots in enumerate(plan.slots):
        if len(layer_slots) != world_size:
            raise PlanError(
                f"slots[{layer}]: has {len(layer_slots)} ranks, the world size is {world_size}"
            )
        for rank, rank_slots in enumerate(layer_slots):
            wanted = 0 if rank in absent else plan.slots_per_rank
            if len(rank_slots) != wanted:
                raise PlanError(
                    f"slots[{layer}][{rank}]: has {len(rank_slots)} slots, "
                    + (
                        f"rank {rank} is absent (absentRanks) and holds none"
                        if rank in absent
                        else f"slotsPerRank is {plan.slots_per_rank}"
                    )
                )
            for slot, expert in enumerate(rank_slots):
                if not 0 <= expert < num_experts:
                    raise PlanError(
                        f"slots[{layer}][{rank}][{slot}]: expert {expert} does not exist "
                        f"(experts are 0..{num_experts - 1})"
                    )
        placed = {expert for rank_slots in layer_slots for expert in rank_slots}
        missing = sorted(set(range(num_experts)) - placed)
        if missing:
            raise PlanError(
                f"slots[{layer}]: experts {missing} have no slot; every expert needs at least one"
            )
    if plan.gate_bias is not None:
        _validate_gate_bias(plan.gate_bias, num_layers=num_layers, num_experts=num_experts)


def _validate_absent(absent: Sequence[int], world_size: int) -> None:
    if list(absent) != sorted(set(absent)) or not all(0 <= r < world_size for r in absent):
        raise PlanError(
            f"absentRanks: {list(absent)} must be distinct ranks 0..{world_size - 1}, sorted"
        )
    if 0 in absent or len(absent) >= world_size:
        raise PlanError("absentRanks: rank 0 (the leader) and at least one rank stay in the group")


def _validate_gate_bias(
    gate_bias: Sequence[Sequence[float]], *, num_layers: int, num_experts: int
) -> None:
    if len(gate_bias) != num_layers:
        raise PlanError(f"gateBias: has {len(gate_bias)} layers, the model has {num_layers}")
    for layer, row in enumerate(gate_bias):
        if len(row) != num_experts:
            raise PlanError(
                f"gateBias[{layer}]: has {len(row)} values, expertsPerLayer is {num_experts}"
            )
        if any(value != value or abs(value) == float("inf") for value in row):
            raise PlanError(f"gateBias[{layer}]: values must be finite numbers")


def round_robin_slots(
    num_layers: int, num_experts: int, world_size: int, slots_per_rank: int
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The seed's placement (section 5.1): expert e of every layer on rank e % world.

    Slot k of rank r has index i = k * R + r and holds expert i while i < E, so with one slot per
    rank expert e sits on rank e % R. Spare slots (i >= E) hold replicas, shifted by one rank per
    round (expert (i + i // E) % E) so that with E == R a rank's replica is its neighbour's expert,
    not a second copy of its own. Returns slots [L][R][S].
    """
    if world_size * slots_per_rank < num_experts:
        raise PlanError(
            f"slotsPerRank: {world_size} ranks x {slots_per_rank} slots cannot hold "
            f"{num_experts} experts; raise slotsPerRank or the expert parallelism"
        )
    layer = tuple(
        tuple(
            _round_robin_expert(slot * world_size + rank, num_experts)
            for slot in range(slots_per_rank)
        )
        for rank in range(world_size)
    )
    return tuple(layer for _ in range(num_layers))


def _round_robin_expert(index: int, num_experts: int) -> int:
    return index if index < num_experts else (index + index // num_experts) % num_experts


def round_robin_plan(
    num_layers: int, num_experts: int, world_size: int, slots_per_rank: int = 1, version: int = 1
) -> Plan:
    """The initial plan every deployment starts from."""
    slots = round_robin_slots(num_layers, num_experts, world_size, slots_per_rank)
    return Plan(version=version, slotsPerRank=slots_per_rank, slots=slots, method="RoundRobin")


# ---------------------------------------------------------------- what a plan change moves

LayerSlots = Sequence[Sequence[int]]
"""One layer's placement: [R][S] logical expert ids."""


def experts_to_receive(before: LayerSlots, after: LayerSlots) -> list[list[int]]:
    """Per rank [R], the experts it holds in `after` but not in `before`, sorted.

    A rank that already holds an expert (in any slot) copies it locally for another slot, so only
    experts new to the rank travel: this is what a switch moves, and what the operator reports.
    """
    return [sorted(set(new) - set(old)) for old, new in zip(before, after, strict=True)]


def moved_experts(before: LayerSlots, after: LayerSlots) -> int:
    """How many expert copies travel rank to rank when one layer goes from `before` to `after`."""
    return sum(len(experts) for experts in experts_to_receive(before, after))


FROM_WEIGHTS = -1
"""`Transfer.src` of an expert no live rank holds: its receiver reads it from the weights (the
checkpoint, tensor by tensor, or the synthetic weights' seed)."""


@dataclass(frozen=True)
class Transfer:
    """Expert `expert` of `layer` goes from rank `src` to rank `dst` during a plan switch
    (`src` FROM_WEIGHTS: `dst` reads it from the weights, no live rank holding it)."""

    layer: int
    expert: int
    src: int
    dst: int


def plan_transfers(old: Plan, new: Plan) -> list[Transfer]:
    """Every expert a rank needs under `new` but did not hold under `old`, with a fixed source.

    Sources are spread over the old holders (by destination rank) so one rank is not the sender of
    every copy of a hot expert. A holder absent from `new` is gone (a lost rank) and sends
    nothing; an expert no other holder has is read from the weights (`FROM_WEIGHTS`). Sorted, so
    sender and receiver post messages in the same order.
    """
    gone = new.absent
    transfers = []
    for layer in range(new.num_layers):
        holders: dict[int, list[int]] = {}
        for rank, experts in enumerate(old.slots[layer]):
            for expert in experts:
                holders.setdefault(expert, [])
                if rank not in holders[expert] and rank not in gone:
                    holders[expert].append(rank)
        wanted = experts_to_receive(old.slots[layer], new.slots[layer])
        for rank, experts in enumerate(wanted):
            for expert in experts:
                sources = holders.get(expert) or [FROM_WEIGHTS]
                transfers.append(Transfer(layer, expert, sources[rank % len(sources)], rank))
    return sorted(transfers, key=lambda t: (t.layer, t.expert, t.src, t.dst))


# ---------------------------------------------------------------- routing by pod


def pod_routes(
    layer: LayerSlots, ranks_per_pod: int, pod: int
) -> dict[int, list[tuple[int, float]]]:
    """Where the ranks of `pod` send each expert's tokens: expert -> [(global slot, share)].

    Every rank is taken to send each expert the same share of its tokens, so each of the P pods
    sends 1 / P of expert e's tokens, and its n_p replicas (c in all) must carry n_p / c of them
    for every replica to carry 1 / c, the even split the planner balances for. A pod keeps its
    tokens at home up to that: the share min(1, P n_p / c) goes to its own replicas, evenly;
    the rest to the pods whose replicas need more than their own pod sends (n_q / c > 1 / P),
    in proportion to what they lack. So the fraction of e's tokens that leave their pod is
    sum_p max(0, 1 / P - n_p / c), the least any routing with even replica loads allows.

    Args:
        layer: [R][S] the layer's slots (global slot of rank r, slot k: r * S + k).
        ranks_per_pod: ranks of one pod; R must be a multiple of it.
        pod: the sending pod.
    Returns:
        per expert its (global slot, share) pairs, shares summing to 1.
    """
    ranks, per_rank = len(layer), max(len(rank_slots) for rank_slots in layer)
    pods = ranks // ranks_per_pod
    places: dict[int, list[list[int]]] = {}
    for rank, rank_slots in enumerate(layer):
        for slot, expert in enumerate(rank_slots):
            by_pod = places.setdefault(expert, [[] for _ in range(pods)])
            by_pod[rank // ranks_per_pod].append(rank * per_rank + slot)
    routes: dict[int, list[tuple[int, float]]] = {}
    for expert, by_pod in places.items():
        count = sum(len(slots) for slots in by_pod)
        home = min(1.0, pods * len(by_pod[pod]) / count)
        lacking = [max(0.0, len(slots) / count - 1 / pods) for slots in by_pod]
        total_lack = sum(lacking)
        shares: list[tuple[int, float]] = []
        for other, slots in enumerate(by_pod):
            if other == pod:
                part = home
            else:
                part = (1 - home) * lacking[other] / total_lack if total_lack > 0 else 0.0
            shares += [(slot, part / len(slots)) for slot in slots if part > 0]
        routes[expert] = shares
    return routes
