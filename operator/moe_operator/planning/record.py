"""The plan's durable record: which plan the ConfigMap must hold, and when to rewrite it.

Pure. The ConfigMap is the record workers start from, so it must never go back: a plan version
the operator once issued is never issued again with other contents, and a lost or corrupted
record never rolls the group back to the round-robin start. What the operator remembers (the
`ledger.Ledger` read from status) and what the leader serves tell it how far versions have gone.

One key per model shape (`PlanShape.key`): during a group restart for a new shape the old pods
keep reading the old shape's plan and only the new pods read the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from moe_contract.plan import Plan, PlanError, round_robin_plan, validate_plan
from moe_operator.planning.ledger import Ledger


@dataclass(frozen=True)
class PlanShape:
    """What a plan must fit: L layers x E experts on R ranks with S slots each at start, grown
    online up to `max_slots_per_rank` (0: S) where the GPUs have memory to spare."""

    layers: int
    experts: int
    world: int
    slots_per_rank: int
    max_slots_per_rank: int = 0

    @property
    def key(self) -> str:
        """The ConfigMap key (and a readable name) of this shape's plan."""
        return f"plan-L{self.layers}-E{self.experts}-R{self.world}-S{self.slots_per_rank}.json"

    def problem(self, plan: Plan) -> str | None:
        """Why `plan` does not fit this shape, or None."""
        try:
            validate_plan(
                plan,
                num_layers=self.layers,
                num_experts=self.experts,
                world_size=self.world,
                max_slots_per_rank=max(self.slots_per_rank, self.max_slots_per_rank),
            )
        except PlanError as error:
            return str(error)
        if plan.slots_per_rank < self.slots_per_rank:
            return f"slotsPerRank: {plan.slots_per_rank}, the spec says {self.slots_per_rank}"
        return None

    def round_robin(self, version: int) -> Plan:
        return round_robin_plan(
            self.layers, self.experts, self.world, self.slots_per_rank, version=version
        )


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    write: bool  # the ConfigMap key must be (re)written with `plan`
    reason: str  # "" when kept; else a sentence for an Event


def choose_plan(
    shape: PlanShape,
    stored: Plan | None,
    stored_problem: str | None,
    ledger: Ledger,
    leader: Callable[[], Plan | None],
    other_versions: Iterable[int] = (),
) -> PlanChoice:
    """The plan the ConfigMap's key for `shape` must hold.

    Args:
        stored: the plan under that key (None: missing or unparsable, see stored_problem).
        ledger: versions (and the desired digest) status remembers.
        leader: the plan rank 0 serves, asked only when the record cannot be trusted; None when
            it cannot be reached.
        other_versions: versions seen elsewhere (the ConfigMap's other keys).
    Returns:
        The stored plan when it fits and is at least as new as anything issued; else the
        leader's plan when it fits and is (restore the record from what serves); else a fresh
        round-robin plan newer than every version known (versions never go back).
    """
    if stored is not None:
        stored_problem = shape.problem(stored) or (
            None
            if ledger.vouches_for(stored)
            else f"holds version {stored.version}, older than the plan issued "
            f"({ledger.desired}) or with other contents"
        )
        if stored_problem is None:
            return PlanChoice(stored, write=False, reason="")
    if stored_problem is None and ledger.desired == 0:
        return PlanChoice(shape.round_robin(1), write=True, reason="round-robin plan 1 created")
    served = leader()
    if served is not None and shape.problem(served) is None and ledger.vouches_for(served):
        return PlanChoice(
            served,
            write=True,
            reason=f"plan ConfigMap {stored_problem or 'missing'}: restored plan "
            f"{served.version} from the leader, which serves it",
        )
    seen = [plan.version for plan in (stored, served) if plan is not None]
    version = ledger.next_version(*other_versions, *seen)  # raises NoVersionLeft, a PlanError
    return PlanChoice(
        shape.round_robin(version),
        write=True,
        reason=f"plan ConfigMap {stored_problem or 'missing'}: wrote round-robin plan "
        f"{version}, newer than every version known, so nothing goes back",
    )
