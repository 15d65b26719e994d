"""A rank joining its group and loading its shard.

`joined_group` meets the group on the rendezvous store (waiting up to the startup timeout: pods
start minutes apart) and starts the rank's membership (`runtime.membership`): at start-up every
rank forms epoch 0 together; a process started while the group serves (a rank's replacement) is
a joining one, let in at a later epoch after it loaded. On exit the store is released, so that
nothing of the group (the master's store server and its thread, its port) outlives
`Runtime.run`. A process already in a group (tests that fork ranks) is used as it is, with no
membership of its own: a lost member then ends every rank.

`load_rank` builds this rank's engine on the leader's initial plan, its KV cache, the runner and
the switch side, publishing each in the rank's state as it is built, then waits for every peer to
have loaded (on the startup clock) and meets them at a barrier. A joining rank builds its engine
on the layout the group serves, which gives it no slot (its experts come from the holders once
it is in), and waits to be let in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_worker.ep import group
from moe_worker.ep.comm import Comm
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.models.base import DTYPES
from moe_worker.models.kv_cache import KVCache
from moe_worker.models.weights import WeightSource
from moe_worker.runtime.initial_plan import agreed_initial_plan
from moe_worker.runtime.membership import Membership
from moe_worker.runtime.state import RankState
from moe_worker.settings import WorkerSettings
from moe_worker.switch.commands import RankSwitch, Switched
from moe_worker.switch.mover import ExpertMover

KV_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Joined:
    """A rank in its group: where it computes, and (a group of its own) its membership."""

    device: torch.device
    store: dist.Store | None
    """The rendezvous store; None when the process was already in a group."""
    membership: Membership | None = None
    joining: bool = False
    """The group was serving already: this process joins it once loaded."""

    @property
    def comm(self) -> Comm | None:
        return None if self.membership is None else self.membership.comm


@contextmanager
def joined_group(settings: WorkerSettings) -> Iterator[Joined]:
    """The rank in its group (see the module) while in it."""
    s = settings
    if dist.is_initialized():
        yield Joined(torch.device(s.device or "cpu"), None)
        return
    device, backend = group.resolve_device(s.device, s.backend, s.local_rank)
    store = group.rendezvous(
        s.master_addr, s.master_port, s.rank, s.world_size,
        startup_timeout_s=s.startup_timeout, listen_address=s.store_address,
    )  # fmt: skip
    membership = Membership(
        store,
        lambda: group.connect(s.master_addr, s.master_port, s.startup_timeout),
        s.rank,
        s.world_size,
        backend=backend,
        hang_s=s.heartbeat_timeout,
        collective_timeout_s=s.collective_timeout,
    )
    joining = not s.is_leader and membership.running()
    membership.start()
    if not joining:
        group.wait_for_peers(store, "joined", s.world_size, s.startup_timeout)
        membership.first_epoch(s.world_size, s.startup_timeout)
    yield Joined(device, store, membership, joining)


def load_rank(
    settings: WorkerSettings,
    source: WeightSource,
    joined: Joined,
    state: RankState,
    on_switched: Callable[[Switched], None],
) -> tuple[EPEngine, ModelRunner, RankSwitch]:
    """Collective: load this rank's shard into `state`; returns once every rank has (a joining
    rank: once it is let into the group)."""
    s, comm = settings, joined.comm
    dtype = DTYPES[s.model.dtype]
    if joined.joining:
        assert joined.membership is not None
        record, layout = joined.membership.served()
        engine = state.engine = EPEngine(
            source, layout, rank=s.rank, device=joined.device, dtype=dtype, record=record
        )
    else:
        plan = agreed_initial_plan(s, comm)
        engine = state.engine = EPEngine(
            source, plan, rank=s.rank, device=joined.device, dtype=dtype, comm=comm
        )
    cache = KVCache.for_shape(
        s.model, s.kv_cache_tokens, block_size=KV_BLOCK_SIZE, dtype=dtype, device=joined.device
    )
    runner = state.runner = ModelRunner(engine, cache, s.rank)
    # A joining rank forms its transfer group with the others when it is let in.
    world = 1 if joined.joining else s.world_size
    switch = RankSwitch(ExpertMover(engine), world, s.switch_timeout, on_switched, comm)
    state.switch = switch
    if joined.joining:
        assert joined.membership is not None
        joined.membership.join(s.startup_timeout)
        return engine, runner, switch
    if joined.store is not None:  # ranks load at their own pace: wait on the startup clock
        group.wait_for_peers(joined.store, "loaded", s.world_size, s.startup_timeout)
    (comm or Comm.world()).barrier()
    if joined.membership is not None and s.is_leader:
        joined.membership.publish_served(engine.record, engine.plan)
    return engine, runner, switch
