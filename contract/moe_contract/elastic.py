"""When ranks are lost: the plan the survivors serve at once, and how well a plan anticipates a
loss. Pure (the leader of the workers and the operator both use it); no torch.

A lost rank's slots are gone. `degraded_plan` keeps every expert served by the live ranks with
the fewest moves: every expert that still has a live replica stays where it is, and each orphan
(an expert whose every replica was on lost ranks) takes one slot of a survivor, where it is read
from the weights (no live rank holds it: `plan.plan_transfers` says FROM_WEIGHTS). The slots:

1. spare memory first: the live ranks grow by as few slots per rank as the orphans need, up to
   `max_slots_per_rank` (placement.maxSlotsPerRank); a grown slot no orphan needs holds a copy
   of an expert its rank already has (copied locally, nothing travels);
2. then slots holding a replica of an expert that keeps another live replica: the expert with
   the most live replicas gives one up first, and, among its replicas, one whose failure domain
   (pod) keeps another replica of it, so an expert held in two pods stays in two pods;
3. else there is no room (`NoRoom`, naming the layer, the orphans and the fix): the group is
   restarted whole, as before elastic serving.

The lost ranks' rows are empty and listed in `absentRanks`; the version stays the plan's own
(the served plan is the operator's plan, degraded: GET /v1/plan keeps answering the operator's).
The same function takes a degraded plan further (a second loss) and, given the full plan and
more live ranks, computes the layout of a group growing back (all live: the plan itself).

`redundancy` says how a plan would take the loss of one rank or one pod (status.redundancy), and
`spread_replicas` rearranges spare replicas so that every expert is on two ranks of two pods
where the slots allow (what Auto keeps, `moe_operator.planning.planners`).

Legend: L layers, R ranks, S slots per rank, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from moe_contract.plan import Plan, PlanError

Rows = list[list[int]]
"""One layer's slots [R][S] as lists (built here, frozen into a Plan at the end)."""


class NoRoom(PlanError):
    """The live ranks cannot hold every expert: the group must restart whole (the message says
    which layer, which experts, and what would make room)."""


def domain_of(rank: int, ranks_per_pod: int | None) -> int:
    """The failure domain of a rank: its pod (a pod of one rank: the rank itself)."""
    return rank // (ranks_per_pod or 1)


def degraded_plan(
    plan: Plan, live: Iterable[int], *, max_slots_per_rank: int | None = None
) -> Plan:
    """The plan `live` ranks serve: every other rank absent, every expert on a live rank.

    Args:
        plan: the plan served now (the operator's, or one already degraded), [L][R][S].
        live: ranks in the group (rank 0, the leader, among them).
        max_slots_per_rank: the most slots per rank the ranks have memory for (None: S, no
            growth).
    Returns:
        `plan` itself when every rank of it is live and it has no absent rank left to fill;
        otherwise a plan of the same version with `absentRanks` and the fewest orphans moved.
    Raises:
        NoRoom: the live ranks' slots cannot hold every expert of some layer.
    """
    world = plan.world_size
    alive = sorted(set(live))
    if not alive or alive[0] != 0 or alive[-1] >= world:
        raise PlanError(f"live ranks {alive}: rank 0 and only ranks below {world} can be live")
    absent = tuple(rank for rank in range(world) if rank not in alive)
    returning = sorted(plan.absent.intersection(alive))
    if returning:
        raise PlanError(
            f"live ranks {returning} hold no slot in plan {plan.version}: compute the layout of "
            "a group growing back from the full plan"
        )
    if not absent:
        return plan
    domains = plan.ranks_per_pod
    layers = [_live_rows(layer, alive) for layer in plan.slots]
    orphans = [_orphans(layer, rows) for layer, rows in zip(plan.slots, layers, strict=True)]
    size = plan.slots_per_rank
    ceiling = max(size, max_slots_per_rank or size)
    grow = max((math.ceil(len(o) / len(alive)) for o in orphans), default=0)
    grow = min(grow, ceiling - size)
    for layer, (rows, lost) in enumerate(zip(layers, orphans, strict=True)):
        left = _grow(rows, lost, alive, grow, size)
        left = _overwrite_replicas(rows, left, alive, domains)
        if left:
            raise NoRoom(_no_room(layer, left, alive, size + grow, ceiling))
    slots = tuple(tuple(tuple(row) for row in rows) for rows in layers)
    update = {"slots": slots, "slots_per_rank": size + grow, "absent_ranks": absent or None}
    return plan.model_copy(update=update)


def _live_rows(layer: Sequence[Sequence[int]], alive: Sequence[int]) -> Rows:
    return [list(row) if rank in alive else [] for rank, row in enumerate(layer)]


def _orphans(layer: Sequence[Sequence[int]], rows: Rows) -> list[int]:
    """Experts of the layer that no live row holds, ascending."""
    held = {expert for row in rows for expert in row}
    return sorted({expert for row in layer for expert in row} - held)


def _grow(rows: Rows, orphans: list[int], alive: Sequence[int], grow: int, size: int) -> list[int]:
    """Give every live rank `grow` more slots: orphans first (to the ranks with the fewest taken
    so far, lowest rank first), the rest local copies of the rank's first expert. The orphans
    left over."""
    left = list(orphans)
    for turn in range(grow):
        for rank in alive:
            row = rows[rank]
            row.append(left.pop(0) if left else row[0])
            assert len(row) == size + turn + 1
    return left


def _overwrite_replicas(
    rows: Rows, orphans: list[int], alive: Sequence[int], ranks_per_pod: int | None
) -> list[int]:
    """Orphans into slots holding a replica of an expert that keeps another live one. The
    orphans left over (no such slot)."""
    left = list(orphans)
    while left:
        victim = _spare_slot(rows, alive, ranks_per_pod)
        if victim is None:
            break
        rank, slot = victim
        rows[rank][slot] = left.pop(0)
    return left


def _spare_slot(
    rows: Rows, alive: Sequence[int], ranks_per_pod: int | None
) -> tuple[int, int] | None:
    """The slot whose replica matters least: of the expert with the most live replicas, one in a
    pod that keeps another replica of it, on the rank holding the most replicas of the expert
    (then the highest rank and slot: ties go away from the leader)."""
    places: dict[int, list[tuple[int, int]]] = {}
    for rank in alive:
        for slot, expert in enumerate(rows[rank]):
            places.setdefault(expert, []).append((rank, slot))
    best: tuple[tuple[int, int, int, int, int], tuple[int, int]] | None = None
    for spots in places.values():
        if len(spots) < 2:
            continue
        per_domain: dict[int, int] = {}
        per_rank: dict[int, int] = {}
        for rank, _ in spots:
            per_domain[domain_of(rank, ranks_per_pod)] = (
                per_domain.get(domain_of(rank, ranks_per_pod), 0) + 1
            )
            per_rank[rank] = per_rank.get(rank, 0) + 1
        for rank, slot in spots:
            keeps_domain = per_domain[domain_of(rank, ranks_per_pod)] > 1 or len(per_domain) > 2
            key = (len(spots), int(keeps_domain), per_rank[rank], rank, slot)
            if best is None or key > best[0]:
                best = (key, (rank, slot))
    return None if best is None else best[1]


def _no_room(layer: int, orphans: list[int], alive: Sequence[int], size: int, most: int) -> str:
    return (
        f"slots[{layer}]: experts {orphans} had every replica on the lost ranks, and the "
        f"{len(alive)} live ranks have no slot to spare ({size} slots per rank, "
        f"placement.maxSlotsPerRank {most}, every other expert on one live rank only); "
        "raise placement.maxSlotsPerRank, or give experts a second replica (spare slots, "
        "rebalancing Auto), so that a lost rank leaves room"
    )


# ---------------------------------------------------------------- anticipating a loss


@dataclass(frozen=True)
class Redundancy:
    """How a plan takes the loss of a rank or a pod (status.redundancy)."""

    single_replica: tuple[int, ...]
    """Per layer [L]: experts held by one rank only (lost with that rank)."""
    single_domain: tuple[int, ...]
    """Per layer [L]: experts whose every replica is in one pod (lost with that pod); equal to
    `single_replica` with pods of one rank."""

    @property
    def worst_single_replica(self) -> int:
        return max(self.single_replica, default=0)

    @property
    def worst_single_domain(self) -> int:
        return max(self.single_domain, default=0)

    @property
    def survives_domain_loss(self) -> bool:
        """Every expert stays served, without a move, when any one pod is lost."""
        return self.worst_single_domain == 0


def redundancy(plan: Plan) -> Redundancy:
    """Experts of each layer on a single rank, and within a single pod."""
    single_rank, single_pod = [], []
    for layer in plan.slots:
        ranks: dict[int, set[int]] = {}
        for rank, row in enumerate(layer):
            for expert in row:
                ranks.setdefault(expert, set()).add(rank)
        single_rank.append(sum(len(held) == 1 for held in ranks.values()))
        single_pod.append(
            sum(
                len({domain_of(r, plan.ranks_per_pod) for r in held}) == 1
                for held in ranks.values()
            )
        )
    return Redundancy(tuple(single_rank), tuple(single_pod))


def spread_replicas(
    slots: Sequence[Sequence[Sequence[int]]],
    load: Sequence[Sequence[float]],
    ranks_per_pod: int | None = None,
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Every expert on two ranks of two failure domains where the slots allow.

    Per layer, while an expert is held in one domain only (the most loaded such first): where
    another such expert sits in another domain and both have two replicas or more, one replica
    of each trades places; else a replica another expert can spare (it keeps two domains
    without it), in a domain the lone one lacks, becomes the lone one's: the spare replica
    with the least load per replica left. Layers with fewer than 2 slots per expert are left
    as they are, and so is a layer where no trade or spare replica is left. The slots per rank
    do not change.

    Args:
        slots: [L][R][S] placement (a plan's slots).
        load: [L][E] tokens per expert (to choose which replicas to give up).
        ranks_per_pod: ranks of one failure domain (None or 1: every rank its own).
    """
    out = []
    for layer, layer_load in zip(slots, load, strict=True):
        rows = [list(row) for row in layer]
        if sum(len(row) for row in rows) >= 2 * len(layer_load):
            _spread_layer(rows, layer_load, ranks_per_pod)
        out.append(tuple(tuple(row) for row in rows))
    return tuple(out)


def _spread_layer(rows: Rows, load: Sequence[float], ranks_per_pod: int | None) -> None:
    while True:
        places: dict[int, list[tuple[int, int]]] = {e: [] for e in range(len(load))}
        for rank, row in enumerate(rows):
            for slot, expert in enumerate(row):
                places[expert].append((rank, slot))

        def domains(spots: Sequence[tuple[int, int]]) -> set[int]:
            return {domain_of(rank, ranks_per_pod) for rank, _ in spots}

        lone = [e for e in places if len(domains(places[e])) < 2]
        if not lone:
            return
        needy = max(lone, key=lambda e: (load[e], -e))
        if not (
            _swap(rows, needy, lone, places, domains) or _take(rows, needy, places, load, domains)
        ):
            return


def _swap(rows: Rows, needy: int, lone: Sequence[int], places: dict, domains: Any) -> bool:
    """Two experts of two replicas or more, each within its own domain: one replica of each
    trades places (replica counts unchanged), and both span two domains."""
    home = domains(places[needy])
    if len(places[needy]) < 2:
        return False
    for other in lone:
        if other == needy or len(places[other]) < 2 or domains(places[other]) & home:
            continue
        (rank_a, slot_a), (rank_b, slot_b) = places[needy][-1], places[other][-1]
        rows[rank_a][slot_a], rows[rank_b][slot_b] = other, needy
        return True
    return False


def _take(rows: Rows, needy: int, places: dict, load: Sequence[float], domains: Any) -> bool:
    """A replica to spare (its expert keeps two domains without it), in a domain `needy` lacks,
    becomes `needy`'s: the one with the least load per replica left."""
    home = domains(places[needy])
    best: tuple[float, int, int] | None = None
    for donor, spots in places.items():
        if donor == needy or len(spots) < 2:
            continue
        for rank, slot in spots:
            rest = [s for s in spots if s != (rank, slot)]
            if domains([(rank, slot)]) & home:
                continue
            if len(domains(rest)) < 2:
                continue  # the donor would be left in one domain (or on one rank)
            key = (load[donor] / len(rest), rank, slot)
            if best is None or key < best:
                best = key
    if best is None:
        return False
    _, rank, slot = best
    rows[rank][slot] = needy
    return True
