"""One rank's part in the group's membership, kept in the rendezvous store (rank 0 serves it).

    moe-ep/epoch                 the current epoch number (the leader writes it last)
    moe-ep/epoch/<e>/record      the epoch's members (`serving.membership.EpochRecord`, JSON)
    moe-ep/epoch/<e>/in          members that reached the epoch (a counter: they then form its
                                 process group under moe-ep/epoch/<e>/group)
    moe-ep/epoch/<e>/broken      members whose collective of the epoch failed (a counter)
    moe-ep/beat/<rank>/<inc>     a member's heartbeat (a counter, every BEAT_S)
    moe-ep/join/<rank>           a process (an incarnation) of a rank asking to join
    moe-ep/served                the plan the group serves and its layout (for a joining rank)

Every rank runs a heartbeat thread on a store connection of its own: it counts its beats and
reads the epoch number, so a collective stuck on a lost member is abandoned within a wait slice
of the leader's verdict (`watch`). On the leader a monitor thread reads every member's beats
(`serving.membership.Liveness`), the broken counter, and the joins; `Membership.changes` says
what the leader's loop must act on. The leader writes every record; the others follow
(`next_epoch`). No HTTP, no metrics here.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from moe_contract.plan import Plan, parse_plan
from moe_worker.ep.comm import Comm, epoch_group
from moe_worker.serving.membership import BEAT_S, EpochRecord, Liveness, Member

log = logging.getLogger("moe_worker.runtime.membership")

EPOCH = "moe-ep/epoch"
JOINER_SILENCE_S = 1.0
"""A process asking to join whose beat has not moved for this long is not let in (gone)."""
SERVED = "moe-ep/served"
_POLL_S = 0.02


def _record_key(epoch: int) -> str:
    return f"{EPOCH}/{epoch}/record"


def _beat_key(member: Member) -> str:
    return f"moe-ep/beat/{member.rank}/{member.incarnation}"


def _join_key(rank: int) -> str:
    return f"moe-ep/join/{rank}"


class LeaderGone(RuntimeError):
    """The store (rank 0) does not answer: the group restarts whole."""


class Dropped(RuntimeError):
    """This process is no member of the group any more (it was lost: stopped, hung, or slow):
    it must not serve; a new process of its rank joins again."""


class NoEpoch(RuntimeError):
    """No new epoch came within the collective timeout."""


@dataclass(frozen=True)
class Changes:
    """What the leader's loop must act on: members lost, processes ready to join, or a failed
    collective that lost nobody (the group forms again as it is)."""

    lost: dict[int, str]
    joining: tuple[Member, ...] = ()
    reform: bool = False

    def __bool__(self) -> bool:
        return bool(self.lost or self.joining or self.reform)


class Membership:
    """This rank's membership: its incarnation, its heartbeat, the current epoch and its comm."""

    def __init__(
        self,
        store: dist.Store,
        connect: Callable[[], dist.Store],
        rank: int,
        world_size: int,
        *,
        backend: str,
        hang_s: float,
        collective_timeout_s: float,
    ) -> None:
        """`connect` opens another connection to the store (for the heartbeat thread)."""
        self.store, self.rank, self.backend = store, rank, backend
        self.world_size = world_size
        self.me = Member(rank, f"{os.getpid()}-{secrets.token_hex(4)}")
        self.collective_timeout_s = collective_timeout_s
        self.record: EpochRecord | None = None
        self.comm: Comm | None = None
        self.watching = False
        """Verdicts count only once the group serves (loading may starve a heartbeat)."""
        self._beat = _Heartbeat(connect(), self.me)
        self._monitor = _Monitor(connect(), hang_s, world_size) if rank == 0 else None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def epoch(self) -> int:
        return -1 if self.record is None else self.record.epoch

    def start(self) -> None:
        self._beat.start()
        if self._monitor is not None:
            self._monitor.start()

    # ------------------------------------------------------------ the watch of a collective

    def serving(self) -> None:
        """The group serves from now on: silences count (timed from now)."""
        self.watching = True
        if self._monitor is not None and self.record is not None:
            self._monitor.begin(self.record)

    def watch(self) -> str | None:
        """Why the current epoch is over for this rank, else None (cheap: no store access)."""
        if not self.watching:
            return None
        if self._beat.gone is not None:
            return f"the leader's store does not answer ({self._beat.gone})"
        if self._monitor is not None:
            changes = self._monitor.changes(time.monotonic())
            if changes.lost:
                return "lost " + "; ".join(f"rank {r}: {why}" for r, why in changes.lost.items())
            if changes.reform:
                return "a collective failed and every member is alive: the group forms again"
            return None
        newer = self._beat.newest_epoch
        if newer is not None and newer > self.epoch:
            return f"the leader began epoch {newer}"
        return None

    def changes(self) -> Changes:
        """Leader: what the loop must act on now (members lost, ranks ready to join)."""
        assert self._monitor is not None
        return self._monitor.changes(time.monotonic())

    def report_lost(self, ranks: Sequence[int], why: str) -> None:
        """Leader: someone who knows (the operator) says these ranks are gone."""
        if self._monitor is not None:
            for rank in ranks:
                self._monitor.report(rank, why)

    def failed(self) -> None:
        """A collective of the current epoch failed on this rank: the leader suspects."""
        try:
            self.store.add(f"{EPOCH}/{self.epoch}/broken", 1)
        except RuntimeError as error:
            raise LeaderGone(str(error)) from error

    # ------------------------------------------------------------ epochs

    def first_epoch(self, world_size: int, incarnations_timeout_s: float) -> Comm:
        """Every rank at start-up: epoch 0 of all `world_size` ranks."""
        self.store.set(f"moe-ep/incarnation/{self.rank}", self.me.incarnation)
        if self.is_leader:
            keys = [f"moe-ep/incarnation/{r}" for r in range(world_size)]
            self.store.wait(keys, timedelta(seconds=incarnations_timeout_s))
            members = tuple(Member(r, self.store.get(key).decode()) for r, key in enumerate(keys))
            self._publish(EpochRecord(0, members, reason="the group formed"))
        return self._form(self._await(-1, incarnations_timeout_s))

    def next_epoch(self, changes: Changes | None = None) -> Comm:
        """After the current epoch ended: the next one (written by the leader from `changes`,
        followed by the others), formed. Dropped if this process is not in it."""
        timeout = self.collective_timeout_s
        while True:
            lead = self.is_leader
            record = self._lead(changes) if lead else self._await(self.epoch, timeout)
            comm = self._form(record, timeout)
            if comm is not None:
                return comm
            changes = None  # someone did not come: the leader's monitor says who, next round

    def join(self, timeout_s: float) -> Comm:
        """A new process of this rank, the group running: ask to join, wait to be let in."""
        self.store.set(_join_key(self.rank), self.me.incarnation)
        deadline = time.monotonic() + timeout_s
        while True:
            record = self._await(self._current(), max(1.0, deadline - time.monotonic()))
            if record.holds(self.rank, self.me.incarnation):
                comm = self._form(record, self.collective_timeout_s)
                if comm is not None:
                    return comm
            elif time.monotonic() > deadline:
                raise NoEpoch(f"not let into the group within {timeout_s:g} s")
            self.record = record

    def running(self) -> bool:
        """Whether the group already serves (a process starting now joins it)."""
        return self.store.check([EPOCH])

    def publish_served(self, record: Plan, layout: Plan) -> None:
        """Leader: the plan served and its layout, for ranks that join."""
        document = {"record": record.to_document(), "layout": layout.to_document()}
        self.store.set(SERVED, json.dumps(document, separators=(",", ":")))

    def served(self) -> tuple[Plan, Plan]:
        """(the plan the group serves, its layout) as the leader published them."""
        document = json.loads(self.store.get(SERVED))
        return parse_plan(document["record"]), parse_plan(document["layout"])

    # ------------------------------------------------------------ inside

    def _lead(self, changes: Changes | None) -> EpochRecord:
        assert self._monitor is not None and self.record is not None
        changes = changes or self._monitor.wait_for_changes(self.collective_timeout_s)
        why = "; ".join(f"rank {r} lost: {w}" for r, w in changes.lost.items())
        if changes.joining:
            joined = ", ".join(str(m.rank) for m in changes.joining)
            why = f"{why}; rank {joined} joined" if why else f"rank {joined} joined"
        record = self.record.next(changes.lost, changes.joining, why or "the group formed again")
        self._publish(record)
        for member in changes.joining:  # let in: its request is answered
            self.store.delete_key(_join_key(member.rank))
        return record

    def _publish(self, record: EpochRecord) -> None:
        self.store.set(_record_key(record.epoch), record.to_json())
        self.store.set(EPOCH, str(record.epoch))
        log.info("epoch %d: members %s (%s)", record.epoch, list(record.ranks), record.reason)

    def _current(self) -> int:
        try:
            return int(self.store.get(EPOCH)) if self.store.check([EPOCH]) else -1
        except RuntimeError as error:
            raise LeaderGone(str(error)) from error

    def _await(self, after: int, timeout_s: float) -> EpochRecord:
        """The newest epoch's record once it is past `after`."""
        deadline = time.monotonic() + timeout_s
        while (epoch := self._current()) <= after:
            if time.monotonic() > deadline:
                raise NoEpoch(f"no epoch after {after} within {timeout_s:g} s")
            time.sleep(_POLL_S)
        return EpochRecord.from_json(self.store.get(_record_key(epoch)))

    def _form(self, record: EpochRecord, timeout_s: float | None = None) -> Comm | None:
        """Meet the other members of `record` and form its process group; None when the epoch
        moved on meanwhile (a member did not come), Dropped when this process is not in it."""
        if not record.holds(self.rank, self.me.incarnation):
            raise Dropped(
                f"rank {self.rank} is not in epoch {record.epoch} ({record.reason}); it leaves "
                "the group, and a new process of it joins again"
            )
        self.record = record
        if self._monitor is not None:
            self._monitor.begin(record)
        key = f"{EPOCH}/{record.epoch}/in"
        self.store.add(key, 1)
        deadline = time.monotonic() + (timeout_s or self.collective_timeout_s)
        while int(self.store.add(key, 0)) < len(record.members):
            moved_on = self._current() > record.epoch
            if moved_on or (
                self._monitor is not None and self._monitor.changes(time.monotonic()).lost
            ):
                return None  # the leader writes the next epoch without who did not come
            if time.monotonic() > deadline:
                raise NoEpoch(f"epoch {record.epoch}: not every member came")
            time.sleep(_POLL_S)
        members = record.ranks
        group = epoch_group(
            self.store,
            f"{EPOCH}/{record.epoch}/group",
            members.index(self.rank),
            len(members),
            self.backend,
            self.collective_timeout_s,
        )
        if self.comm is not None:
            self.comm.retire()
        self.comm = Comm(
            group,
            members,
            self.rank,
            backend=self.backend,
            epoch=record.epoch,
            watch=self.watch,
            store=self.store,
            timeout_s=self.collective_timeout_s,
        )
        return self.comm


class _Heartbeat(threading.Thread):
    """Counts this process's beats and reads the epoch number, every BEAT_S."""

    def __init__(self, store: dist.Store, me: Member) -> None:
        super().__init__(name="moe-heartbeat", daemon=True)
        self.store, self.key = store, _beat_key(me)
        self.newest_epoch: int | None = None
        self.gone: str | None = None

    def run(self) -> None:
        while self.gone is None:
            try:
                self.store.add(self.key, 1)
                if self.store.check([EPOCH]):
                    self.newest_epoch = int(self.store.get(EPOCH))
            except RuntimeError as error:
                self.gone = str(error) or type(error).__name__
                return
            time.sleep(BEAT_S)


class _Monitor(threading.Thread):
    """The leader's view of its members' liveness and of the ranks asking to join."""

    def __init__(self, store: dist.Store, hang_s: float, world_size: int) -> None:
        super().__init__(name="moe-monitor", daemon=True)
        self.store, self.world_size = store, world_size
        self.liveness = Liveness(hang_s)
        self._lock = threading.Lock()
        self._record: EpochRecord | None = None
        self._joining: tuple[Member, ...] = ()
        self._joiner_beats: dict[Member, tuple[int, float]] = {}
        """Beats of processes asking to join, and when each count was first read: one that
        stopped beating (it died while waiting) is not let in."""

    def begin(self, record: EpochRecord) -> None:
        with self._lock:
            self._record = record
            self.liveness.begin([m.rank for m in record.members if m.rank != 0], time.monotonic())
            self._joining = ()

    def report(self, rank: int, why: str) -> None:
        with self._lock:
            self.liveness.report(rank, why)

    def changes(self, now: float) -> Changes:
        with self._lock:
            return Changes(
                self.liveness.lost(now), self._joining, self.liveness.suspicion_cleared(now)
            )

    def wait_for_changes(self, timeout_s: float) -> Changes:
        """After a collective failed here: suspect, and wait for the verdict."""
        with self._lock:
            self.liveness.suspect(time.monotonic())
        deadline = time.monotonic() + timeout_s
        while not (changes := self.changes(time.monotonic())):
            if time.monotonic() > deadline:
                raise NoEpoch("no verdict on the group's members")
            time.sleep(_POLL_S)
        return changes

    def run(self) -> None:
        while True:
            try:
                self._observe()
            except RuntimeError as error:  # the store is this process's own: it is stopping
                log.warning("the membership monitor stops: %s", error)
                return
            time.sleep(BEAT_S)

    def _observe(self) -> None:
        with self._lock:
            record = self._record
        if record is None:
            return
        now = time.monotonic()
        counts = {m.rank: int(self.store.add(_beat_key(m), 0)) for m in record.members}
        broken = int(self.store.add(f"{EPOCH}/{record.epoch}/broken", 0))
        joining = []
        for rank in self._absent(record):
            if self.store.check([_join_key(rank)]):
                member = Member(rank, self.store.get(_join_key(rank)).decode())
                if self._beating(member, int(self.store.add(_beat_key(member), 0)), now):
                    joining.append(member)
        with self._lock:
            if self._record is not record:
                return
            for rank, count in counts.items():
                self.liveness.beat(rank, count, now)
            if broken:
                self.liveness.suspect(now)
            self._joining = tuple(joining)

    def _beating(self, member: Member, count: int, now: float) -> bool:
        seen = self._joiner_beats.get(member)
        if seen is None or seen[0] != count:
            self._joiner_beats[member] = seen = (count, now)
        return count > 0 and now - seen[1] < JOINER_SILENCE_S

    def _absent(self, record: EpochRecord) -> list[int]:
        return [rank for rank in range(self.world_size) if rank not in record.ranks]
