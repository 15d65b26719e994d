"""The plan-version ledger: the one place where plan versions are read, compared and counted.

Pure. Versions come from the plan documents (the ConfigMap's, the leader's), the ConfigMap's
plan-version annotation, status.plan (version, appliedVersion, digest) and, in a status written
by an operator before this one, status.detection (desiredVersion, appliedVersion). The ledger
turns them into three facts and every question asked about them:

- `desired`: the newest plan the operator issued, the one its durable record holds; it never
  goes back (a lost or older record is replaced by a plan above it, never trusted);
- `applied`: the version the leader last said it serves (0: unknown);
- `digest`: the desired plan's digest, which tells the operator's plan from someone else's of
  the same version;
- `next_version`: above every version seen anywhere, so no version is ever issued twice;
- `foreign`: the leader serves a plan the operator did not issue, so its own is issued again
  above it (`issue(..., above=served)`).

Status keeps one copy: status.plan. An older operator's status.detection versions are read as
lower bounds (an upgrade keeps a running deployment's versions) and removed on the next write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from moe_contract.plan import MAX_PLAN_VERSION, Plan, PlanError

LEGACY_DETECTION_FIELDS = ("desiredVersion", "appliedVersion")
"""status.detection's copies of the versions, written by operators before the ledger."""


class NoVersionLeft(PlanError):
    """Plan versions end at MAX_PLAN_VERSION: nothing can be issued above `last`."""

    def __init__(self, last: int) -> None:
        super().__init__(f"version: no version left after {last}; recreate the object")
        self.last = last


def _version(value: Any) -> int:
    return int(value or 0)


@dataclass(frozen=True)
class Ledger:
    """A deployment's plan versions (0: none known)."""

    desired: int = 0
    """The newest plan version the operator issued: the durable record's."""
    applied: int = 0
    """The version the leader last said it serves."""
    digest: str = ""
    """The desired plan's digest (`Plan.digest()`); empty: a status from before digests."""

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> Ledger:
        """The versions a MoEDeployment's status remembers, with an older operator's copies in
        status.detection as lower bounds."""
        status = status or {}
        plan = status.get("plan") or {}
        legacy = status.get("detection") or {}
        version = _version(plan.get("version"))
        desired = max(version, _version(legacy.get("desiredVersion")))
        applied = max(_version(plan.get("appliedVersion")), _version(legacy.get("appliedVersion")))
        digest = str(plan.get("digest") or "") if version == desired else ""
        return cls(desired, applied, digest)

    @property
    def in_flight(self) -> bool:
        """A plan was issued that the leader does not serve yet."""
        return self.desired > self.applied

    def vouches_for(self, plan: Plan) -> bool:
        """Whether `plan` may be the record: at least as new as what was issued, and if it is
        the very version issued, the very contents (when a digest is known)."""
        if plan.version != self.desired:
            return plan.version > self.desired
        return not self.digest or plan.digest() == self.digest

    def is_ours(self, version: int, digest: str) -> bool:
        """Whether a plan the leader serves is the desired plan itself."""
        return version == self.desired and digest == self.digest

    def foreign(self, version: int, digest: str) -> bool:
        """Whether the leader serves a plan the operator did not issue: the desired version or
        a newer one, with other contents. The desired plan is then issued again above it."""
        return version >= self.desired and not self.is_ours(version, digest)

    def next_version(self, *seen: int) -> int:
        """A version above every one known and `seen` (other keys, the leader's, a stored
        plan's): never one issued before. Raises NoVersionLeft past MAX_PLAN_VERSION."""
        last = max(self.desired, self.applied, *seen)
        if last >= MAX_PLAN_VERSION:
            raise NoVersionLeft(last)
        return last + 1

    def recorded(self, plan: Plan) -> Ledger:
        """The durable record holds `plan` (`record.choose_plan` chose it): it is desired."""
        if not self.vouches_for(plan):
            raise ValueError(
                f"version: plan {plan.version} would take the record back from plan "
                f"{self.desired}; versions never go back"
            )
        return replace(self, desired=plan.version, digest=plan.digest())

    def issue(self, plan: Plan, *, above: int = 0) -> tuple[Plan, Ledger]:
        """`plan` numbered above every version known (and `above`), and the ledger that has
        it as the desired plan. Raises NoVersionLeft."""
        issued = plan.with_version(self.next_version(above))
        return issued, replace(self, desired=issued.version, digest=issued.digest())

    def serving(self, version: int) -> Ledger:
        """The leader says it serves `version`: the desired plan or an older one (a newer or
        another one is `foreign`, and issued above first)."""
        return replace(self, applied=version)

    def lost_in_status(self, record_version: int, annotated: int | None) -> bool:
        """Whether the record holds a plan newer than status knows, written by a rebalance (its
        plan-version annotation names it): the operator died between writing the plan and
        patching status, so what the annotations carry is restored from them."""
        return record_version > self.desired and annotated == record_version
