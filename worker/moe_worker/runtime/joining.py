"""A rank joining its group and loading its shard.

`joined_group` joins the process group (waiting on the rendezvous store up to the startup timeout:
pods start minutes apart) and leaves it on exit, its store released with it, so that nothing of
the group (the master's store server and its thread, its port) outlives `Runtime.run`. A process
already in a group (tests that fork ranks) is used as it is.

`load_rank` builds this rank's engine on the leader's initial plan, its KV cache, the runner and
the switch side, publishing each in the rank's state as it is built, then waits for every peer to
have loaded (on the startup clock) and meets them at a barrier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from moe_worker.ep import group
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.models.base import DTYPES
from moe_worker.models.kv_cache import KVCache
from moe_worker.models.weights import WeightSource
from moe_worker.runtime.initial_plan import agreed_initial_plan
from moe_worker.runtime.state import RankState
from moe_worker.settings import WorkerSettings
from moe_worker.switch.commands import RankSwitch, Switched
from moe_worker.switch.mover import ExpertMover

KV_BLOCK_SIZE = 16


@contextmanager
def joined_group(settings: WorkerSettings) -> Iterator[tuple[torch.device, dist.Store | None]]:
    """(the device to compute on, the rendezvous store; None when the process was already in a
    group) while in the group."""
    s = settings
    if dist.is_initialized():
        yield torch.device(s.device or "cpu"), None
        return
    device, backend = group.resolve_device(s.device, s.backend, s.local_rank)
    store = group.join(
        backend,
        s.master_addr,
        s.master_port,
        s.rank,
        s.world_size,
        collective_timeout_s=s.collective_timeout,
        startup_timeout_s=s.startup_timeout,
        listen_address=s.store_address,
    )
    try:
        yield device, store
    finally:
        dist.destroy_process_group()


def load_rank(
    settings: WorkerSettings,
    source: WeightSource,
    device: torch.device,
    store: dist.Store | None,
    state: RankState,
    on_switched: Callable[[Switched], None],
) -> tuple[EPEngine, ModelRunner, RankSwitch]:
    """Collective: load this rank's shard into `state`; returns once every rank has."""
    s = settings
    plan = agreed_initial_plan(s)
    dtype = DTYPES[s.model.dtype]
    engine = state.engine = EPEngine(source, plan, rank=s.rank, device=device, dtype=dtype)
    cache = KVCache.for_shape(
        s.model, s.kv_cache_tokens, block_size=KV_BLOCK_SIZE, dtype=dtype, device=device
    )
    runner = state.runner = ModelRunner(engine, cache, s.rank)
    switch = RankSwitch(ExpertMover(engine), s.world_size, s.switch_timeout, on_switched)
    state.switch = switch
    if store is not None:  # ranks load at their own pace: wait on the startup clock
        group.wait_for_peers(store, "loaded", s.world_size, s.startup_timeout)
    dist.barrier()
    return engine, runner, switch
