"""The process group of one rank: joining it, the device it computes on, and the two small
collectives of the serving loop (the leader's step descriptor out, every rank's result in).

Both carry JSON text as uint8 tensors: plain data, never pickled objects, on any backend (nccl
moves CUDA tensors only, gloo CPU ones), over a `comm.Comm` (one membership epoch's process
group; None: the default process group).
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_worker.ep.comm import Comm

log = logging.getLogger("moe_worker.ep.group")


def resolve_device(device: str, backend: str, local_rank: int) -> tuple[torch.device, str]:
    """The device and backend of a rank: cuda + nccl when a GPU is visible (one per local rank),
    else cpu + gloo; explicit settings win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device), backend


def join(
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    *,
    collective_timeout_s: float,
    startup_timeout_s: float,
    listen_address: str = "",
) -> dist.Store:
    """Join the group once every rank is there; returns its store (for `wait_for_peers`).

    Two clocks: pods of one group start minutes apart (image pulls, scheduling), so joining
    waits up to `startup_timeout_s` on the rendezvous store, and only then does the process
    group begin, whose collectives fail after `collective_timeout_s` (a dead or hung peer: the
    rank's loop ends, the process exits non-zero and the group is brought back whole).
    """
    store = rendezvous(
        master_addr, master_port, rank, world_size,
        startup_timeout_s=startup_timeout_s, listen_address=listen_address,
    )  # fmt: skip
    wait_for_peers(store, "joined", world_size, startup_timeout_s)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    return store


def rendezvous(
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    *,
    startup_timeout_s: float,
    listen_address: str = "",
) -> dist.Store:
    """The group's rendezvous store: rank 0 serves it, the others connect (waiting up to the
    startup timeout for rank 0 to listen)."""
    log.info("rank %d/%d meeting the group at %s:%d", rank, world_size, master_addr, master_port)
    return dist.TCPStore(
        master_addr,
        master_port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=startup_timeout_s),
        wait_for_workers=False,
        master_listen_fd=_listener(listen_address, master_port) if rank == 0 else None,
    )


def connect(master_addr: str, master_port: int, timeout_s: float) -> dist.Store:
    """Another connection to the group's store (a thread of its own talks over it)."""
    return dist.TCPStore(
        master_addr,
        master_port,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _listener(address: str, port: int) -> int | None:
    """A socket listening on `address` only, for rank 0's store; None (the store listens on every
    address) for a wildcard. torch's own store would take the port on every address of the
    machine: two local clusters' groups (pods on their own 127.x.y.z) would meet on one store."""
    if address in ("", "0.0.0.0", "::"):  # env.WILDCARD_ADDRESSES
        return None
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener.detach()  # the store owns it from here


def wait_for_peers(store: dist.Store, step: str, world_size: int, timeout_s: float) -> None:
    """Count this rank in for `step` and wait until all `world_size` are: a barrier on the
    rendezvous store, with its own (startup) timeout instead of the collectives' one."""
    key = f"moe-ep/{step}"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while (count := store.add(key, 0)) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{count} of {world_size} ranks reached '{step}' within {timeout_s:g} s"
            )
        time.sleep(0.1)


INLINE_BYTES = 16 * 1024
"""Messages up to this size travel in ONE collective (length header + payload in a fixed-size
buffer); a longer one (a step admitting many long prompts) takes a second for the rest. A step
is latency-bound by its collectives, so the common case pays one, not two."""
_HEADER = 8


def _framed(payload: bytes, device: torch.device) -> torch.Tensor:
    """[length (8 bytes, little-endian) | payload | zeros] of INLINE_BYTES, as uint8."""
    head = payload[: INLINE_BYTES - _HEADER]
    frame = bytearray(INLINE_BYTES)
    frame[:_HEADER] = len(payload).to_bytes(_HEADER, "little")
    frame[_HEADER : _HEADER + len(head)] = head
    return torch.frombuffer(frame, dtype=torch.uint8).to(device)


def _unframe(frame: torch.Tensor) -> tuple[int, bytes]:
    raw = frame.cpu().numpy().tobytes()
    size = int.from_bytes(raw[:_HEADER], "little")
    return size, raw[_HEADER : _HEADER + min(size, INLINE_BYTES - _HEADER)]


def _rest(payload: bytes) -> torch.Tensor:
    """What does not fit in the frame (maybe nothing)."""
    rest = payload[INLINE_BYTES - _HEADER :]
    if not rest:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(rest), dtype=torch.uint8)


def broadcast_text(text: str | None, comm: Comm | None = None, src: int = 0) -> str:
    """Collective: `text` of rank `src` on every member (others pass None)."""
    comm = comm or Comm.world()
    if comm.size == 1:  # nothing to send; a world-1 group still keeps the loop
        assert text is not None
        return text
    device = comm.device
    payload = text.encode() if comm.rank == src and text is not None else b""
    frame = _framed(payload, device)
    comm.broadcast(frame, src)
    size, head = _unframe(frame)
    if size <= len(head):
        return head.decode()
    rest = (
        _rest(payload).to(device)
        if payload
        else torch.empty(size - len(head), dtype=torch.uint8, device=device)
    )
    comm.broadcast(rest, src)
    return (head + rest.cpu().numpy().tobytes()).decode()


def gather_text(text: str, comm: Comm | None = None) -> list[str]:
    """Collective: every member's `text`, in member order (on every rank: all_gather works on
    every backend, where gather does not; the texts are small)."""
    comm = comm or Comm.world()
    if comm.size == 1:
        return [text]
    device = comm.device
    payload = text.encode()
    world = comm.size
    frames = [torch.empty(INLINE_BYTES, dtype=torch.uint8, device=device) for _ in range(world)]
    comm.all_gather(frames, _framed(payload, device))
    parts = [_unframe(frame) for frame in frames]
    longest = max(size - len(head) for size, head in parts)
    if longest == 0:
        return [head.decode() for _, head in parts]
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    rest = _rest(payload)
    mine[: rest.numel()] = rest.to(device)
    tails = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    comm.all_gather(tails, mine)
    return [
        (head + tail.cpu().numpy().tobytes()[: size - len(head)]).decode()
        for (size, head), tail in zip(parts, tails, strict=True)
    ]
