"""The process group one rank's collectives run on: one membership epoch of the group.

A group that survives a member cannot keep one process group: a lost member breaks it for good
(gloo fails the survivors' next collective; a stopped member leaves them waiting). So every
membership epoch has a process group of its own, built without `init_process_group` over a
prefix of the rendezvous store (`epoch_group`): a collective of an old epoch can never meet one
of a new epoch (other prefix, other connections), and the old group is never destroyed, only
dropped (`Comm.retire`; a pending operation of it may still time out later, harmlessly).

Members keep their identity: a rank is the plan's rank (its original rank), and its rank in an
epoch's process group is its index among the members (`group_rank_of`). A collective is waited
for in slices (`Comm.wait`): between two slices the epoch's `Watch` says whether the epoch is
over (the leader decided a member is lost, or this rank was dropped), and then the collective is
abandoned with `GroupFailed`; so is a collective that fails (a peer's connection closed). A
member's liveness is judged by its heartbeat, never by how long a collective takes, so a long
step on a slow CPU is not a failure.

`Comm.world()` is the default process group (tests that fork ranks with `init_process_group`,
benchmarks): no watch, plain waits, and any failure raises as it is.

NCCL (written, not run here: no GPU): the epoch's `ProcessGroupNCCL` is built the same way over
the store prefix; a wait polls `is_completed()` instead of blocking in `wait()` (which returns
at once on the host), and a retired epoch's communicator is aborted (`abort()`), so kernels
stuck on the dead peer are released and nothing ever waits for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("moe_worker.ep.comm")

WAIT_SLICE = timedelta(milliseconds=50)
"""A collective is waited for in slices this long; between two, the watch is asked whether the
epoch is over (a blocked collective is abandoned within a slice of the verdict)."""
_POLL_S = 0.0005
"""NCCL: the host polls a collective's completion this often (its wait() does not block)."""

Watch = Callable[[], str | None]
"""Why the epoch is over for this rank (a member lost, this rank dropped, the leader gone), or
None while it goes on. Called between wait slices: cheap, never blocking (it reads what the
membership thread found)."""

_RETIRED: list[object] = []
"""Process groups of past epochs: kept referenced, never destroyed (their pending operations
may still touch them until they time out)."""


class GroupFailed(RuntimeError):
    """A collective of this epoch failed or was abandoned: the epoch is over for this rank."""


def epoch_group(
    store: dist.Store,
    prefix: str,
    rank: int,
    size: int,
    backend: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """A process group of `size` members over `store` under `prefix`, this process being member
    `rank` (0..size-1); no default process group needed (and none touched)."""
    prefixed = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    group = dist.ProcessGroup(prefixed, rank, size)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        nccl = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        device, kind = torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL
        group._set_default_backend(kind)
        group._register_backend(device, kind, nccl)
    else:
        gloo = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        kind = dist.ProcessGroup.BackendType.GLOO
        group._set_default_backend(kind)
        group._register_backend(torch.device("cpu"), kind, gloo)
    return group


class Comm:
    """One epoch's process group as the serving path uses it.

    `members`: the plan ranks in the epoch, ascending (member i is group rank i); `rank`: this
    rank's plan rank. `group` None is the default process group (`world()`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        members: Sequence[int],
        rank: int,
        *,
        backend: str,
        epoch: int = 0,
        watch: Watch | None = None,
        store: dist.Store | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.group, self.members, self.rank = group, tuple(members), rank
        self.backend, self.epoch, self.watch = backend, epoch, watch
        self.store, self.timeout_s = store, timeout_s
        self._index = {member: index for index, member in enumerate(self.members)}
        self._subgroups = 0

    @classmethod
    def world(cls) -> Comm:
        """The default process group (every rank a member; plan rank = group rank)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        return cls(None, range(world), rank, backend=dist.get_backend())

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def group_rank(self) -> int:
        return self._index[self.rank]

    def group_rank_of(self, plan_rank: int) -> int:
        return self._index[plan_rank]

    @property
    def elastic(self) -> bool:
        """Whether a failure ends only this epoch (a watched epoch group), not the process."""
        return self.watch is not None

    @property
    def device(self) -> torch.device:
        """Where this backend's tensors live: nccl moves CUDA tensors only, gloo CPU ones."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------ the collectives

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """`tensor` of plan rank `src` on every member."""
        self._run(lambda: dist.broadcast(tensor, group=self.group, async_op=True,
                                         group_src=self.group_rank_of(src)))  # fmt: skip

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        self._run(lambda: dist.all_gather(outputs, tensor, group=self.group, async_op=True))

    def barrier(self) -> None:
        self._run(lambda: dist.barrier(group=self.group, async_op=True))

    def all_to_all_single(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
    ) -> dist.Work:
        """Issued, not waited for: `wait(work)` later (splits are per member, in member order)."""
        try:
            work = dist.all_to_all_single(
                out, inp, out_splits, in_splits, group=self.group, async_op=True
            )
        except RuntimeError as error:
            raise self._failed(error) from error
        assert work is not None
        return work

    def post(
        self,
        messages: Sequence[tuple[bool, torch.Tensor, int]],
        group: dist.ProcessGroup | None = None,
    ) -> list[dist.Work]:
        """Post point-to-point messages, each (send?, tensor, peer plan rank), on `group` (a
        subgroup of this epoch) or the epoch's own; both ends post their pairs' messages in
        the same order. An epoch's groups are not registered in torch's world, so their own
        send/recv carry them (on nccl one after the other, not coalesced: not run here)."""
        group = group or self.group
        if not messages:
            return []
        if self.store is None:  # the default group or one of dist.new_group: global ranks
            ops = [
                dist.P2POp(dist.isend if send else dist.irecv, tensor, peer, group)
                for send, tensor, peer in messages
            ]
            return dist.batch_isend_irecv(ops)
        assert group is not None
        works = []
        for send, tensor, peer in messages:
            post = group.send if send else group.recv
            works.append(post([tensor], self.group_rank_of(peer), 0))
        return works

    def wait(self, work: dist.Work) -> None:
        """Until `work` is done; GroupFailed when it fails or the epoch ends meanwhile."""
        if self.watch is None:
            work.wait()
            return
        if self.backend == "nccl":
            self._poll(work)
            return
        while True:
            try:
                work.wait(WAIT_SLICE)
                return
            except RuntimeError as error:
                if "timed out" not in str(error).lower():
                    raise self._failed(error) from error
            self.check()

    def check(self) -> None:
        """GroupFailed if this epoch is over."""
        why = self.watch() if self.watch is not None else None
        if why is not None:
            raise GroupFailed(f"epoch {self.epoch} is over: {why}")

    # ------------------------------------------------------------ groups of the epoch

    def subgroup(self, name: str, timeout_s: float) -> dist.ProcessGroup:
        """Collective (every member, same point): another process group of the same members
        (the background switch's transfers), under this epoch's prefix."""
        if self.store is None:
            return dist.new_group(backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))
        self._subgroups += 1
        prefix = f"moe-ep/epoch/{self.epoch}/{name}/{self._subgroups}"
        return epoch_group(self.store, prefix, self.group_rank, self.size, self.backend, timeout_s)

    def drop_subgroup(self, group: dist.ProcessGroup) -> None:
        """A subgroup whose messages were abandoned: destroyed on the default group (nccl: its
        communicator aborted), kept referenced and aborted on an epoch group."""
        if self.store is None:
            dist.destroy_process_group(group)
            return
        _retire(group, self.backend)

    def retire(self) -> None:
        """This epoch is over: its group is dropped, never waited on again."""
        if self.group is not None:
            _retire(self.group, self.backend)

    # ------------------------------------------------------------ inside

    def _run(self, issue: Callable[[], dist.Work | None]) -> None:
        try:
            work = issue()
        except RuntimeError as error:
            raise self._failed(error) from error
        assert work is not None
        self.wait(work)

    def _poll(self, work: dist.Work) -> None:
        while True:
            try:
                if work.is_completed():
                    work.wait()
                    return
            except RuntimeError as error:
                raise self._failed(error) from error
            self.check()
            time.sleep(_POLL_S)

    def _failed(self, error: Exception) -> Exception:
        if self.watch is None:
            return error
        self.check()  # the epoch was over already: say so rather than how the peer went away
        return GroupFailed(f"a collective of epoch {self.epoch} failed: {error}")


def exit_would_abort() -> bool:
    """Whether the interpreter's normal exit may abort (SIGABRT, "terminate called without an
    active exception"): process groups of past epochs were dropped with operations pending, or
    this process is one member of a group of several, whose backend threads may still be busy
    with a peer that already left (1 drain in about 4 of test_launcher's aborted so)."""
    return bool(_RETIRED) or (dist.is_initialized() and dist.get_world_size() > 1)


def _retire(group: dist.ProcessGroup, backend: str) -> None:
    _RETIRED.append(group)
    if backend == "nccl":
        try:
            group.abort()  # type: ignore[attr-defined]  # never wait for the dead peer
        except Exception as error:  # best effort: the group is never used again
            log.warning("aborting a retired NCCL communicator failed: %s", error)
