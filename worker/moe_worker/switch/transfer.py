"""Moving experts between ranks for a plan switch.

Every expert a rank lacks under the new plan comes point to point from one holder, exactly as
`plan.plan_transfers` lists (sorted, so both ends of a pair post their messages in the same
order): one message per matrix, read straight from the sender's stacked slot (a contiguous
view) into a staging buffer on the receiver. The stacks themselves change only at the flip
(`SlotStacks.flip`), so the old plan can keep serving from them while messages are in flight.

Two ways to run it:
- blocking: post on the default group and `wait()` at once (the serving pause is the whole
  transfer);
- background: post on a process group of its own (`new_transfer_group`) and let a watcher thread
  wait for the messages (gloo completes a point-to-point message only when someone waits on it;
  on CUDA the thread synchronises a stream of its own). `state()` says pending, done or failed;
  every rank flips at one step boundary once all are done (`switcher`).

No HTTP or metrics code here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_contract.plan import Transfer
from moe_worker.ep.slots import Matrices, SlotStacks

PENDING, DONE, FAILED = "pending", "done", "failed"


def new_transfer_group(timeout_s: float) -> dist.ProcessGroup:
    """Collective (every rank, same point of the loop): a process group for expert moves only,
    so they never queue behind or between the serving loop's collectives."""
    return dist.new_group(backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))


def close_transfer_group(group: dist.ProcessGroup) -> None:
    """Collective: drop a group whose messages were abandoned. On nccl this aborts the
    communicator, so unmatched operations cannot trip its watchdog later."""
    dist.destroy_process_group(group)


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
    ) -> None:
        self.rank, self.group, self.device = rank, group, device
        self.received: dict[tuple[int, int], Matrices] = {}
        self._sends = 0
        self._ops: list[dist.P2POp] = []
        for t in transfers:
            if t.src == rank:
                for matrix in stacks.matrices(t.layer, t.expert):
                    self._ops.append(dist.P2POp(dist.isend, matrix, t.dst, group))
                self._sends += 1
            if t.dst == rank:
                staging = tuple(torch.empty(s, dtype=dtype, device=device) for s in shapes)
                self.received[(t.layer, t.expert)] = staging
                self._ops += [dist.P2POp(dist.irecv, m, t.src, group) for m in staging]
        self._works: list[dist.Work] = []
        self._status = TransferStatus(PENDING)
        self._lock = threading.Lock()
        self._start = 0.0

    @property
    def moves(self) -> int:
        """Experts this rank sends or receives."""
        return self._sends + len(self.received)

    def post(self) -> None:
        """Post every send and receive (returns at once)."""
        self._start = time.perf_counter()
        if self._ops:
            self._works = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        """Block until every message landed; raises what the backend raised."""
        for work in self._works:
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
