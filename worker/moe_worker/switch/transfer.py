"""Moving experts between ranks for a plan switch.

Every expert a rank lacks under the new plan comes point to point from one holder, exactly as
`plan.plan_transfers` lists (sorted, so both ends of a pair post their messages in the same
order): one message per matrix, read straight from the sender's stacked slot (a contiguous
view) into a staging buffer on the receiver. An expert no live rank holds (its holders were
lost: `FROM_WEIGHTS`) is read from the weights by its receiver instead. Peers are plan ranks;
the messages go over the membership epoch's groups (`comm.Comm`). The stacks themselves change
only at the flip (`SlotStacks.flip`), so the old plan can keep serving from them while messages
are in flight.

Two ways to run it:
- blocking: post on the default group and `wait()` at once (the serving pause is the whole
  transfer);
- background: post on a process group of its own (`Comm.subgroup`) and let a watcher thread
  wait for the messages (gloo completes a point-to-point message only when someone waits on it;
  on CUDA the thread synchronises a stream of its own). `state()` says pending, done or failed;
  every rank flips at one step boundary once all are done (`switcher`).

No HTTP or metrics code here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_contract.plan import FROM_WEIGHTS, Transfer
from moe_worker.ep.comm import Comm
from moe_worker.ep.slots import Matrices, SlotStacks

PENDING, DONE, FAILED = "pending", "done", "failed"

ReadExpert = Callable[[int, int], Matrices]
"""(layer, expert) -> its matrices read from the weights."""


def new_transfer_group(timeout_s: float, comm: Comm | None = None) -> dist.ProcessGroup:
    """Collective (every member, same point of the loop): a process group for expert moves
    only, so they never queue behind or between the serving loop's collectives."""
    return (comm or Comm.world()).subgroup("transfer", timeout_s)


@dataclass(frozen=True)
class TransferStatus:
    state: str
    error: str | None = None
    seconds: float | None = None
    """From posting to the last message landed (done), or to the failure."""


class ExpertTransfer:
    """The messages of one plan switch on one rank, and the staging buffers they land in."""

    def __init__(
        self,
        transfers: Sequence[Transfer],
        rank: int,
        stacks: SlotStacks,
        shapes: Sequence[tuple[int, int]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        comm: Comm | None = None,
        read: ReadExpert | None = None,
    ) -> None:
        """`group`: a subgroup of `comm` for the messages (None: `comm`'s own group); `read`:
        how this rank reads an expert no live rank holds."""
        self.rank, self.group, self.device = rank, group, device
        self._comm = comm
        self.received: dict[tuple[int, int], Matrices] = {}
        self._sends = 0
        self._ops: list[tuple[bool, torch.Tensor, int]] = []  # (send?, tensor, peer)
        self._reads: list[tuple[int, int]] = []
        self._read = read
        for t in transfers:
            if t.src == rank:
                for matrix in stacks.matrices(t.layer, t.expert):
                    self._ops.append((True, matrix, t.dst))
                self._sends += 1
            if t.dst == rank and t.src == FROM_WEIGHTS:
                self._reads.append((t.layer, t.expert))
            elif t.dst == rank:
                staging = tuple(torch.empty(s, dtype=dtype, device=device) for s in shapes)
                self.received[(t.layer, t.expert)] = staging
                self._ops += [(False, m, t.src) for m in staging]
        self._works: list[dist.Work] = []
        self._status = TransferStatus(PENDING)
        self._lock = threading.Lock()
        self._start = 0.0

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = Comm.world()
        return self._comm

    @property
    def moves(self) -> int:
        """Experts this rank sends or receives (or reads from the weights)."""
        return self._sends + len(self.received) + len(self._reads)

    def post(self) -> None:
        """Post every send and receive (returns at once), then read what no rank can send."""
        self._start = time.perf_counter()
        if self._ops:
            self._works = self.comm.post(self._ops, self.group)
        for layer, expert in self._reads:
            if self._read is None:
                raise RuntimeError(f"expert {expert} of layer {layer} has no live holder")
            self.received[(layer, expert)] = self._read(layer, expert)

    def wait(self, abandonable: bool = False) -> None:
        """Block until every message landed; raises what the backend raised. `abandonable`:
        on the epoch's terms (`Comm.wait`: GroupFailed when the epoch ends meanwhile)."""
        for work in self._works:
            if abandonable:
                self.comm.wait(work)
            else:
                work.wait()
        if self.device.type == "cuda":  # nccl: the stream waited, now the host does
            torch.cuda.current_stream().synchronize()
        self._set(TransferStatus(DONE, seconds=time.perf_counter() - self._start))

    def watch(self) -> None:
        """Wait in a daemon thread; `state()` tells how it went."""
        threading.Thread(target=self._watch, name="expert-transfer", daemon=True).start()

    def fail(self, error: str) -> None:
        self._set(TransferStatus(FAILED, error, time.perf_counter() - self._start))

    def status(self) -> TransferStatus:
        with self._lock:
            return self._status

    def buffers(self) -> list[object]:
        """Everything a message in flight may still touch (kept by an abandoning caller)."""
        return [self._works, self._ops, self.received]

    def _watch(self) -> None:
        try:
            if self.device.type == "cuda":
                with torch.cuda.stream(torch.cuda.Stream(self.device)):  # the thread's own
                    self.wait()
            else:
                self.wait()
        except Exception as error:  # a dead peer, a timeout: the leader abandons the switch
            self.fail(f"{type(error).__name__}: {error}")

    def _set(self, status: TransferStatus) -> None:
        with self._lock:
            if self._status.state == PENDING:
                self._status = status
