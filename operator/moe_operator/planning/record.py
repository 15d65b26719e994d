"""The plan's durable record: which plan the ConfigMap must hold, and when to rewrite it.

Pure. The ConfigMap is the record workers start from, so it must never go back: a plan version
the operator once issued is never issued again with other contents, and a lost or corrupted
record never rolls the group back to the round-robin start. What the operator remembers (status,
detection state) and what the leader serves tell it how far versions have gone.

One key per model shape (`PlanShape.key`): during a group restart for a new shape the old pods
keep reading the old shape's plan and only the new pods read the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from moe_contract.plan import MAX_PLAN_VERSION, Plan, PlanError, round_robin_plan, validate_plan


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
class Known:
    """Plan versions the operator remembers (status and detection state; 0 when unknown)."""

    desired_version: int = 0
    applied_version: int = 0
    desired_digest: str = ""  # empty: status from before digests were kept

    def vouches_for(self, plan: Plan) -> bool:
        """Whether `plan` may be the record: at least as new as what was issued, and if it is
        the very version issued, the very contents (a digest recorded in status says so)."""
        if plan.version != self.desired_version:
            return plan.version > self.desired_version
        return not self.desired_digest or plan.digest() == self.desired_digest


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    write: bool  # the ConfigMap key must be (re)written with `plan`
    reason: str  # "" when kept; else a sentence for an Event


def choose_plan(
    shape: PlanShape,
    stored: Plan | None,
    stored_problem: str | None,
    known: Known,
    leader: Callable[[], Plan | None],
    other_versions: Iterable[int] = (),
) -> PlanChoice:
    """The plan the ConfigMap's key for `shape` must hold.

    Args:
        stored: the plan under that key (None: missing or unparsable, see stored_problem).
        known: versions (and the desired digest) status remembers.
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
            if known.vouches_for(stored)
            else f"holds version {stored.version}, older than the plan issued "
            f"({known.desired_version}) or with other contents"
        )
        if stored_problem is None:
            return PlanChoice(stored, write=False, reason="")
    if stored_problem is None and known.desired_version == 0:
        return PlanChoice(shape.round_robin(1), write=True, reason="round-robin plan 1 created")
    served = leader()
    if served is not None and shape.problem(served) is None and known.vouches_for(served):
        return PlanChoice(
            served,
            write=True,
            reason=f"plan ConfigMap {stored_problem or 'missing'}: restored plan "
            f"{served.version} from the leader, which serves it",
        )
    versions = [known.desired_version, known.applied_version, *other_versions]
    versions += [plan.version for plan in (stored, served) if plan is not None]
    version = max(versions) + 1
    if version > MAX_PLAN_VERSION:
        raise PlanError(f"version: no version left after {max(versions)}; recreate the object")
    return PlanChoice(
        shape.round_robin(version),
        write=True,
        reason=f"plan ConfigMap {stored_problem or 'missing'}: wrote round-robin plan "
        f"{version}, newer than every version known, so nothing goes back",
    )
