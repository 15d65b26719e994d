"""What the members of a new membership epoch say to each other before they serve again. Torch-free
plain data, as JSON (like the step descriptor).

The leader broadcasts one `Regroup`: the epoch, the last step the group finished (a later step
any rank began is undone: the leader never had every rank's result), the plan served and its
layout (every member must serve exactly this one: a rank that joins takes it, a survivor that
serves another, a flip half done, stops the group), and the layout to serve from now on when
members were lost (their experts read from the weights by the survivors that take them). Every
member answers a `RegroupAnswer`; only when all agree do they move to the new layout, together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moe_contract.plan import Plan, parse_plan


@dataclass(frozen=True)
class Regroup:
    epoch: int
    committed: int
    """The last step every member finished (-1: none yet)."""
    record: Plan
    """The operator's plan the group serves."""
    layout: Plan
    """Its layout served until now (with the lost members' slots)."""
    serve: Plan | None = None
    """The layout from now on (None: `layout`)."""
    lost: tuple[int, ...] = ()
    joined: tuple[int, ...] = ()

    def to_json(self) -> str:
        document: dict[str, Any] = {
            "epoch": self.epoch,
            "committed": self.committed,
            "record": self.record.to_document(),
            "layout": self.layout.to_document(),
            "serve": None if self.serve is None else self.serve.to_document(),
            "lost": self.lost,
            "joined": self.joined,
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Regroup:
        raw = json.loads(text)
        serve = raw["serve"]
        return cls(
            epoch=int(raw["epoch"]),
            committed=int(raw["committed"]),
            record=parse_plan(raw["record"]),
            layout=parse_plan(raw["layout"]),
            serve=None if serve is None else parse_plan(serve),
            lost=tuple(raw["lost"]),
            joined=tuple(raw["joined"]),
        )


@dataclass(frozen=True)
class RegroupAnswer:
    rank: int
    problem: str | None = None
    """Why this member cannot go on with the group (None: it can)."""

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "problem": self.problem})

    @classmethod
    def from_json(cls, text: str) -> RegroupAnswer:
        raw = json.loads(text)
        return cls(int(raw["rank"]), raw.get("problem"))
