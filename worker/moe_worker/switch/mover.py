"""Taking one rank's engine from the plan it serves to another: the memory the switch needs, the
expert messages (`transfer.ExpertTransfer`, exactly as `plan.plan_transfers` lists them) and the
flip that installs what landed (`EPEngine.install`).

`apply` does all of it at once (the blocking switch); `start` posts the messages and returns, the
old plan serving until every rank is ready to `flip` (`switcher.BackgroundSwitcher`).

Every method that communicates is collective: all ranks call it at the same step, in the same
order. No HTTP or metrics code here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_contract.plan import Plan, PlanError, plan_transfers
from moe_worker.ep.engine import EPEngine
from moe_worker.switch.transfer import ExpertTransfer

FreeBytes = Callable[[], int | None]
"""Memory a switch may still allocate on this rank; None: not measured."""


def switch_bytes(
    current_slots: int, new_slots: int, layers: int, received: int, expert_bytes: int
) -> int:
    """Bytes a plan switch allocates on one rank beyond what it holds, at its peak: a staging
    buffer per expert received, the slots added in every layer, and one layer's old stacks
    alive while its new ones are filled (`SlotStacks.flip` regrows layer by layer)."""
    added = max(0, new_slots - current_slots) * layers
    transient = current_slots if new_slots != current_slots else 0
    return (received + added + transient) * expert_bytes


def cuda_free_bytes(device: torch.device) -> int | None:
    """What the device can still give: free memory plus what torch's allocator caches unused;
    None off CUDA (a host's memory is not measured: placement.maxSlotsPerRank bounds it)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


class ExpertMover:
    """Moves `engine` from plan to plan; `free_bytes` measures the memory a switch may use
    (CUDA's free memory by default; tests inject a smaller one)."""

    def __init__(self, engine: EPEngine, free_bytes: FreeBytes | None = None) -> None:
        self.engine = engine
        self.free_bytes = free_bytes or (lambda: cuda_free_bytes(engine.device))

    def check_memory(self, plan: Plan) -> None:
        """Raise PlanError, with the reason and the fix, when switching to `plan` would need
        more memory than this rank has free (measured on CUDA; never refused elsewhere)."""
        free = self.free_bytes()
        if free is None:
            return
        engine = self.engine
        received = sum(t.dst == engine.rank for t in plan_transfers(engine.plan, plan))
        needed = switch_bytes(
            engine.plan.slots_per_rank,
            plan.slots_per_rank,
            engine.shape.layers,
            received,
            engine.expert_bytes,
        )
        if needed > free:
            raise PlanError(
                f"slotsPerRank: plan {plan.version} ({plan.slots_per_rank} slots per rank, "
                f"{received} experts to receive) needs {_size(needed)} more on rank "
                f"{engine.rank} ({engine.device}), which has {_size(free)} free; lower "
                f"placement.maxSlotsPerRank (a slot costs {_size(engine.expert_bytes)} per "
                "layer; `moe-ep perf` reports it)"
            )

    def start(self, plan: Plan, group: dist.ProcessGroup | None) -> ExpertTransfer:
        """Post the messages that bring this rank the experts `plan` adds (on `group`, a
        subgroup of the engine's membership epoch; None: the epoch's own group), and read those
        no live rank holds from the weights. The old plan keeps serving until `flip`. Raises
        PlanError, before any message, when the switch would not fit this rank's memory
        (`check_memory`); collective peers then fail their transfer, and the leader abandons the
        switch with that reason."""
        self.check_memory(plan)
        engine = self.engine
        transfer = ExpertTransfer(
            plan_transfers(engine.plan, plan),
            engine.rank,
            engine.stacks,
            engine.arch.expert_shapes(engine.shape),
            dtype=engine.dtype,
            device=engine.device,
            group=group,
            comm=engine.dispatcher.epoch_comm,
            read=engine.read_expert,
        )
        transfer.post()
        return transfer

    def flip(self, plan: Plan, transfer: ExpertTransfer, record: Plan | None = None) -> int:
        """Serve `plan` (the layout of the operator's `record`, by default itself) from now on,
        its experts copied from `transfer`'s staging buffers (all landed); returns how many
        experts this rank received."""
        self.engine.install(plan, transfer.received, record)
        return len(transfer.received)

    def apply(self, plan: Plan, record: Plan | None = None) -> int:
        """Collective, blocking: switch to `plan` now (a collective of the epoch: GroupFailed if
        the epoch ends meanwhile); returns how many experts this rank received."""
        transfer = self.start(plan, group=None)
        transfer.wait(abandonable=True)
        return self.flip(plan, transfer, record)
